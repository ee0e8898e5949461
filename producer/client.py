"""Two ways for the command line to reach jobs, with one interface: over HTTP to a running API
(``ICHIGO_API_URL`` / ``--api``), or in-process on the store and broker from the settings.
Both submit through ``submit_job`` (the API calls it server-side) and return the same dicts
(``producer.views``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import httpx
from celery import Celery

from ichigo_common.settings import Settings
from ichigo_common.store.migrate import ensure_schema
from ichigo_common.store.repo import Store

from .enqueue import submit_job
from .queue import make_celery
from .views import NotFound, cancel_job, file_list, job_detail, job_list


class ClientError(Exception):
    """A refused or failed request; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"{status}: {detail}" if status else detail)
        self.status, self.detail = status, detail


class Jobs(Protocol):
    def submit(self, **spec: Any) -> str: ...
    def get(self, job_id: str) -> dict[str, Any]: ...
    def list(self, limit: int = 50, offset: int = 0, counts: bool = False) -> dict[str, Any]: ...
    def files(self, job_id: str, state: str | None = None, limit: int = 100,
              offset: int = 0) -> dict[str, Any]: ...
    def cancel(self, job_id: str) -> dict[str, Any]: ...


class HttpJobs:
    """The REST API at ``base_url`` (bearer ``api_key`` if given)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def _call(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(0, f"cannot reach the API at {self.base_url}: {exc}") from exc
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ClientError(response.status_code, str(detail))
        return response.json()

    def submit(self, **spec: Any) -> str:
        body = {k: v for k, v in spec.items() if v is not None}
        return self._call("POST", "/v1/jobs", json=body)["job_id"]

    def get(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def list(self, limit: int = 50, offset: int = 0, counts: bool = False) -> dict[str, Any]:
        params = {"limit": limit, "offset": offset, "counts": str(counts).lower()}
        return self._call("GET", "/v1/jobs", params=params)

    def files(self, job_id: str, state: str | None = None, limit: int = 100,
              offset: int = 0) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if state:
            params["state"] = state
        return self._call("GET", f"/v1/jobs/{job_id}/files", params=params)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/jobs/{job_id}")

    def close(self) -> None:
        self._http.close()


class LocalJobs:
    """The store and broker named by ``settings``, in this process (no API server)."""

    def __init__(self, settings: Settings):
        ensure_schema(settings.database_url)  # RuntimeError: run `ichigo db upgrade`
        self.settings = settings
        self.store = Store(settings.database_url)
        self._celery: Celery | None = None

    @property
    def celery(self) -> Celery:
        if self._celery is None:
            self._celery = make_celery(self.settings)
        return self._celery

    def _view(self, fn: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict:
        try:
            return fn(self.store, *args, **kwargs)
        except NotFound as exc:
            raise ClientError(404, str(exc)) from None

    def submit(self, **spec: Any) -> str:
        return submit_job(self.store, self.celery, self.settings, source="cli", **spec)

    def get(self, job_id: str) -> dict[str, Any]:
        return self._view(job_detail, job_id)

    def list(self, limit: int = 50, offset: int = 0, counts: bool = False) -> dict[str, Any]:
        return self._view(job_list, limit=limit, offset=offset, counts=counts)

    def files(self, job_id: str, state: str | None = None, limit: int = 100,
              offset: int = 0) -> dict[str, Any]:
        return self._view(file_list, job_id, state=state, limit=limit, offset=offset)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._view(cancel_job, job_id)

    def close(self) -> None:
        pass
