"""The Celery application of the workers, configured from ``ICHIGO_*`` settings.

Only JSON crosses the broker (anyone who can write to Redis must not get code run by a pickle).
Late acks, reject-on-worker-lost and prefetch 1: a worker reserves only the one shard it runs,
and a shard whose process died goes back to the queue; the SQL store's leases and attempt
counts keep a re-delivered shard from running twice or looping forever on a poison file.

No torch here: the worker's parent process must never touch CUDA (it does not survive fork);
the model loads lazily in the prefork child on its first shard (``worker.tasks``).
"""

from __future__ import annotations

import multiprocessing

from celery import Celery, signals
from kombu import Exchange, Queue

from ichigo_common.settings import Settings, get_settings
from ichigo_common.tasks import BULK_QUEUE, INTERACTIVE_QUEUE

RESULT_EXPIRES_S = 24 * 3600

#: set in the main process when the worker begins to shut down; shared memory made before the
#: prefork children fork, so a running shard sees it and takes on no more files
SHUTTING_DOWN = multiprocessing.RawValue("b", 0)


def soft_time_limit(hard: float) -> float:
    """The soft limit that lets a shard give its leases back before the hard kill."""
    return hard - min(300.0, hard * 0.1)


def configure(app: Celery, s: Settings) -> Celery:
    transport = {"visibility_timeout": s.visibility_timeout}
    # Redis: poll the queues in the order given to --queues (interactive before bulk), not
    # round robin, so that a waiting interactive shard always goes next
    broker_transport = dict(transport, queue_order_strategy="priority")
    if s.task_time_limit >= s.visibility_timeout:
        raise ValueError(
            f"ICHIGO_TASK_TIME_LIMIT ({s.task_time_limit:g} s) must be below "
            f"ICHIGO_VISIBILITY_TIMEOUT ({s.visibility_timeout:g} s): Redis re-delivers a "
            "message older than the visibility timeout even while it still runs"
        )
    app.conf.update(
        broker_url=s.broker_url,
        result_backend=s.result_backend,
        accept_content=["json"],
        result_accept_content=["json"],
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        broker_transport_options=broker_transport,
        result_backend_transport_options=dict(transport),
        task_time_limit=s.task_time_limit,
        task_soft_time_limit=soft_time_limit(s.task_time_limit),
        task_default_queue=BULK_QUEUE,
        task_queues=(
            Queue(
                INTERACTIVE_QUEUE,
                Exchange(INTERACTIVE_QUEUE, type="direct"),
                routing_key=INTERACTIVE_QUEUE,
            ),
            Queue(BULK_QUEUE, Exchange(BULK_QUEUE, type="direct"), routing_key=BULK_QUEUE),
        ),
        broker_connection_retry_on_startup=True,
        # today's behaviour, pinned (Celery 6 flips the default): a shard keeps running when
        # Redis drops; its leases and idempotent writes make a re-delivery harmless
        worker_cancel_long_running_tasks_on_connection_loss=False,
        result_expires=RESULT_EXPIRES_S,
        # a loaded host can take longer than the default 4 s to bring up a pool child
        worker_proc_alive_timeout=60.0,
        worker_hijack_root_logger=True,
        timezone="UTC",
        enable_utc=True,
    )
    return app


def create_app(settings: Settings | None = None) -> Celery:
    app = Celery("ichigo", include=["worker.tasks", "worker.token_tasks"])
    return configure(app, settings or get_settings())


app = create_app()


_sweeper = None


@signals.worker_ready.connect
def _start_sweeper(sender=None, **_kwargs) -> None:
    """Each worker's main process sweeps for files dead workers left (``worker.sweeper``)."""
    global _sweeper
    settings = get_settings()
    if settings.sweep_seconds <= 0 or _sweeper is not None:
        return
    from ichigo_common.store.repo import Store

    from .sweeper import Sweeper

    _sweeper = Sweeper(Store(settings.database_url), app, settings, settings.sweep_seconds)
    _sweeper.start()


@signals.worker_shutdown.connect
def _stop_sweeper(sender=None, **_kwargs) -> None:
    if _sweeper is not None:
        _sweeper.stop()


@signals.worker_shutting_down.connect
def _note_shutdown(sender=None, **_kwargs) -> None:
    SHUTTING_DOWN.value = 1
