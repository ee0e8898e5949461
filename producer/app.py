"""The REST API: ``create_app`` takes its collaborators (settings, store, Celery client) as
arguments, so tests hand it real small ones, and checks the schema is at head on start-up."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from importlib import metadata

from celery import Celery
from fastapi import Depends, FastAPI, Request, status
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry

from ichigo_common.paths import PathRefused
from ichigo_common.settings import Settings, get_settings
from ichigo_common.store.migrate import ensure_schema
from ichigo_common.store.repo import Store

from .deps import Services, require_api_key
from .metrics import IchigoCollector
from .queue import BrokerUnavailable, make_celery
from .routes import docs, health, interactive, jobs, metrics
from .uploads import FORM_OVERHEAD, BodyLimit

log = logging.getLogger(__name__)


def _version() -> str:
    try:
        return metadata.version("ichigo-batch")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def create_app(settings: Settings | None = None, store: Store | None = None,
               celery_client: Celery | None = None) -> FastAPI:
    settings = settings or get_settings()
    store = store or Store(settings.database_url)
    celery_client = celery_client or make_celery(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await asyncio.to_thread(ensure_schema, store.url)  # RuntimeError: run `ichigo db upgrade`
        if not settings.allowed_roots:
            log.warning("ICHIGO_ALLOWED_ROOTS is empty: every submission will be refused")
        yield

    # the OpenAPI pages are served by routes of our own, behind the key when one is set
    app = FastAPI(title="ichigo-batch", version=_version(), lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.services = Services(settings, store, celery_client)
    app.state.metrics_registry = CollectorRegistry(auto_describe=False)
    app.state.metrics_registry.register(IchigoCollector(store, celery_client, _version()))
    # multipart framing around an upload is small: an announced body beyond this is a 413
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes + FORM_OVERHEAD)
    app.include_router(health.router)
    app.include_router(health.status_router, dependencies=[Depends(require_api_key)])
    app.include_router(jobs.router, dependencies=[Depends(require_api_key)])
    app.include_router(interactive.router, dependencies=[Depends(require_api_key)])
    app.include_router(metrics.router, dependencies=[Depends(require_api_key)])
    app.include_router(docs.router, dependencies=[Depends(require_api_key)])

    @app.exception_handler(PathRefused)
    async def _refused(_request: Request, exc: PathRefused) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_403_FORBIDDEN)

    @app.exception_handler(BrokerUnavailable)
    async def _no_broker(_request: Request, exc: BrokerUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)},
                            status_code=status.HTTP_503_SERVICE_UNAVAILABLE)

    return app
