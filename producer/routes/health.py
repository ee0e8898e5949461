"""``/healthz`` and upstream's ``/health/server-status``: database and broker reachable (200,
else 503), workers as information.

Every probe runs in a thread under a deadline, so a dead or black-holed Redis turns into a
quick 503 instead of a hung request. ``/healthz`` is never behind the API key."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from ..deps import Services, ServicesDep
from ..queue import check_broker, ping_workers

router = APIRouter(tags=["health"])  # never behind the API key
status_router = APIRouter(tags=["health"])  # behind it

PROBE_TIMEOUT_S = 2.5
WORKER_PING_S = 1.0


async def _probe(fn: Callable[[], Any], timeout: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        value = await asyncio.wait_for(asyncio.to_thread(fn), timeout)
    except TimeoutError:
        result: dict[str, Any] = {"ok": False, "error": f"no answer within {timeout:g} s"}
    except Exception as exc:  # noqa: BLE001 - any failure is the probe's answer
        result = {"ok": False, "error": str(exc) or type(exc).__name__}
    else:
        result = {"ok": True}
        if value is not None:
            result["value"] = value
    result["ms"] = round((time.perf_counter() - start) * 1000, 1)
    return result


@router.get("/healthz")
async def healthz(services: ServicesDep, workers: bool = True) -> JSONResponse:
    """``workers=false`` skips the one-second worker ping (for tight liveness probes)."""
    return await _health(services, workers)


@status_router.get("/health/server-status")
async def server_status(services: ServicesDep) -> JSONResponse:
    """Upstream's health endpoint, with the same probes as ``/healthz`` (workers always
    pinged): 200 when database and broker answer, else 503. Behind the API key when one is
    set, like everything but ``/healthz``."""
    return await _health(services, True)


async def _health(services: Services, workers: bool) -> JSONResponse:
    """Database and broker probed side by side, then (if asked) the workers pinged."""

    def database() -> None:
        with services.store.session() as s:
            s.execute(text("SELECT 1"))

    db, broker = await asyncio.gather(_probe(database),
                                      _probe(lambda: check_broker(services.celery)))
    body: dict[str, Any] = {"database": db, "broker": broker}
    if workers and broker["ok"]:
        ping = await _probe(lambda: ping_workers(services.celery, WORKER_PING_S),
                            timeout=WORKER_PING_S + 1)
        names = ping.pop("value", []) if ping["ok"] else []
        body["workers"] = {**ping, "ok": bool(names), "names": names}
    elif workers:
        body["workers"] = {"ok": False, "error": "broker unavailable", "names": []}
    healthy = db["ok"] and broker["ok"]
    body["status"] = "ok" if healthy else "unavailable"
    return JSONResponse(body, status_code=200 if healthy else 503)
