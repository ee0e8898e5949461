"""Request bodies of the REST API (validated: bad input is a 422 before anything runs)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, StringConstraints, model_validator

from .enqueue import LANGUAGE_PATTERN

PathText = Annotated[str, StringConstraints(min_length=1, max_length=4096)]


class JobRequest(BaseModel):
    """``POST /v1/jobs``: absolute paths and globs as the server sees them."""

    model_config = ConfigDict(extra="forbid")

    paths: list[PathText] = Field(default_factory=list, max_length=1000)
    globs: list[PathText] = Field(default_factory=list, max_length=100)
    recursive: bool = False
    model: Annotated[str, StringConstraints(min_length=1, max_length=500)] | None = None
    language: Annotated[str, StringConstraints(pattern=LANGUAGE_PATTERN)] | None = None
    output_dir: PathText | None = None
    priority: int = Field(0, ge=0, le=9, description="0 (default) .. 9 (most urgent)")
    force: bool = Field(False, description="transcribe again content already done with the model")
    callback_url: HttpUrl | None = None
    name: Annotated[str, StringConstraints(max_length=200)] | None = None

    @model_validator(mode="after")
    def _some_input(self) -> JobRequest:
        if not self.paths and not self.globs:
            raise ValueError("give at least one of paths, globs")
        return self

    def submit_kwargs(self) -> dict[str, Any]:
        data = self.model_dump()
        data["callback_url"] = str(self.callback_url) if self.callback_url else None
        return data
