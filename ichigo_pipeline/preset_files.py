"""The bundled preset files (``presets/*.yaml``), without importing torch: the producer checks
model names with this before it queues anything."""

from __future__ import annotations

from importlib import resources


def preset_names() -> list[str]:
    folder = resources.files("ichigo_pipeline") / "presets"
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


def preset_text(name: str) -> str:
    return (resources.files("ichigo_pipeline") / "presets" / f"{name}.yaml").read_text()
