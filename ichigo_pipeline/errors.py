"""Errors the pipeline raises with a message meant for the user."""


class ModelNotFoundError(FileNotFoundError):
    """A model file or repository could not be found (offline, or a wrong path)."""


class ModelConfigError(ValueError):
    """A model configuration that cannot be loaded as given."""
