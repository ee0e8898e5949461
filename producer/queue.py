"""The producer's side of the broker: a bare, JSON-only Celery client that sends units of work
by task *name* (it never imports the worker), and short, bounded broker and worker probes.

Priorities: the API takes 0 (default) .. 9 (most urgent). Kombu's Redis transport serves its
lists lowest number first (``bulk``, then ``bulk\\x06\\x163``, ...), so the number sent is
``9 - priority``. The transport's default priority steps (0, 3, 6, 9) are kept: a worker
listening on those (or on any superset, e.g. 0..9) sees every message.
"""

from __future__ import annotations

from contextlib import nullcontext

from celery import Celery

from ichigo_common.settings import Settings
from ichigo_common.tasks import BULK_QUEUE, TRANSCRIBE_SHARD, shard_payload

MAX_PRIORITY = 9
CONNECT_TIMEOUT_S = 2.0
#: longest wait for one broker reply (a silent broker: a submission fails after this)
SOCKET_TIMEOUT_S = 5.0


class BrokerUnavailable(ConnectionError):
    """The broker cannot be reached; nothing was sent."""


def make_celery(settings: Settings) -> Celery:
    """A sending-only Celery client for ``settings.broker_url`` (JSON only, never pickle)."""
    app = Celery("ichigo-producer", broker=settings.broker_url, backend=settings.result_backend,
                 set_as_current=False)
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_timeout": SOCKET_TIMEOUT_S,
    }
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=BULK_QUEUE,
        task_send_sent_event=True,  # Flower sees units when they are queued
        broker_transport_options=transport,
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout},
        redis_socket_connect_timeout=CONNECT_TIMEOUT_S,
        redis_socket_timeout=SOCKET_TIMEOUT_S,
        broker_connection_timeout=CONNECT_TIMEOUT_S,
        task_publish_retry_policy={"max_retries": 3, "interval_start": 0,
                                   "interval_step": 0.5, "interval_max": 1},
    )
    return app


def broker_priority(priority: int) -> int:
    """The Redis transport's priority (0 served first) for an API priority (9 most urgent)."""
    if not 0 <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority must be between 0 and {MAX_PRIORITY}")
    return MAX_PRIORITY - priority


def check_broker(app: Celery) -> None:
    """Connect once (bounded by the connect timeout), or raise BrokerUnavailable."""
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=0, timeout=CONNECT_TIMEOUT_S)
    except Exception as exc:  # kombu wraps transport errors in OperationalError
        raise BrokerUnavailable(f"broker unreachable: {exc}") from exc


def ping_workers(app: Celery, timeout: float = 1.0) -> list[str]:
    """Names of the workers that answered a control ping within ``timeout`` seconds."""
    replies = app.control.ping(timeout=timeout) or []
    return sorted(name for reply in replies for name in reply)


class ShardSender:
    """Sends TRANSCRIBE_SHARD units; each group goes out over one pooled producer, taken only
    while sending (a slow walk between groups holds no broker connection).

    ``ignore_result``: the SQL store is the record; without it every send would also subscribe
    the producer to a result channel, one per unit."""

    def __init__(self, app: Celery, priority: int, queue: str = BULK_QUEUE):
        self.app, self.queue = app, queue
        self.priority = broker_priority(priority)
        self.sent = 0

    def send(self, job_id: str, shards: list[list[int]]) -> None:
        if not shards:
            return
        with self.app.producer_or_acquire() as producer:
            group = getattr(producer, "batch", None)  # one pipeline (kombu >= 5.7)
            with group() if callable(group) else nullcontext():
                for file_ids in shards:
                    self.app.send_task(TRANSCRIBE_SHARD, kwargs=shard_payload(job_id, file_ids),
                                       queue=self.queue, priority=self.priority,
                                       ignore_result=True, producer=producer)
                    self.sent += 1
