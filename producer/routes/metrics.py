"""``/metrics``: Prometheus exposition of the figures ``producer.metrics`` reads at scrape time.

Behind the API key when one is set (Prometheus: ``authorization: {credentials: <key>}`` in
the scrape config). The format follows the ``Accept`` header as prometheus_client's own
handlers do: OpenMetrics when asked for, else the plain text format."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.exposition import choose_encoder

router = APIRouter(tags=["monitoring"])


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request) -> Response:
    """Files and jobs by state, audio and compute seconds, failures, queue depth, recent
    throughput, and whether the database and the broker answered (``ichigo_up``)."""
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(request.app.state.metrics_registry), media_type=content_type)
