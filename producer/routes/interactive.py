"""Interactive endpoints as upstream's server has them (filled in by the interactive work)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["interactive"])
