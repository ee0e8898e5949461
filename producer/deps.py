"""The API's collaborators and its guard: one ``Services`` object per app, handed to routes
through a dependency; an optional bearer key checked in constant time."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from celery import Celery
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ichigo_common.settings import Settings
from ichigo_common.store.repo import Store


@dataclass(frozen=True)
class Services:
    settings: Settings
    store: Store
    celery: Celery


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]

_bearer = HTTPBearer(auto_error=False, description="ICHIGO_API_KEY, when the server sets one")


def require_api_key(
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """With ``settings.api_key`` set, demand ``Authorization: Bearer <key>``."""
    expected = services.settings.api_key
    if expected is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or invalid API key",
                            headers={"WWW-Authenticate": "Bearer"})
