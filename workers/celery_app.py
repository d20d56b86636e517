"""The Celery app. Imported by the API to send job ids, so it must not import torch (tasks import it lazily)."""

from __future__ import annotations

import os
import signal

from celery import Celery
from celery.signals import setup_logging, worker_init, worker_process_init

from service.lifeline import PARENT_PID_ENV, die_with_parent, kill_own_group, watch_parent
from service.logs import use_json_logs
from service.settings import Settings, get_settings


def make_celery(settings: Settings) -> Celery:
    app = Celery("hubtune", broker=settings.celery_broker_url, include=["workers.tasks"])
    longest_task = max(settings.rank_time_limit_seconds, settings.tune_time_limit_seconds)
    if settings.celery_broker_url.startswith("filesystem"):
        settings.ensure_dirs()
        # One folder for in and out makes the queue visible to every process sharing HUBTUNE_HOME.
        transport_options = {
            "data_folder_in": str(settings.broker_dir / "queue"),
            "data_folder_out": str(settings.broker_dir / "queue"),
            "processed_folder": str(settings.broker_dir / "processed"),
            # kombu's default is ./control in the current directory: keep exchange tables in HOME too
            "control_folder": str(settings.broker_dir / "control"),
            "store_processed": False,
        }
        remote_control = False  # the filesystem transport has no fanout exchange
    else:
        # An unacknowledged message comes back only after the visibility timeout: keep it above the longest task.
        # The socket timeouts bound every broker call (a frozen Redis accepts the connection and never answers), so
        # sending a job id costs at most about two of them: one try and one retry on a fresh connection.
        transport_options = {"visibility_timeout": longest_task + 3600,
                             "socket_timeout": settings.broker_timeout_seconds,
                             "socket_connect_timeout": settings.broker_timeout_seconds}
        remote_control = True
    app.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=settings.broker_timeout_seconds,
        # One retry covers a pooled connection the broker closed (a restart); more would only lengthen the wait of a
        # request while the broker is down: an unsent job is sent again by the reconciler.
        task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_enable_remote_control=remote_control,
        # Task events (received, started, succeeded, failed) for Flower and `celery events`; they go out on a fanout
        # exchange, which only a broker with remote control has. task-sent comes from the API's send_task.
        worker_send_task_events=remote_control,
        task_send_sent_event=remote_control,
        task_default_queue="rank",
        task_ignore_result=True,
        task_routes={"hubtune.rank": {"queue": "rank"}, "hubtune.tune": {"queue": "tune"},
                     "hubtune.rank_candidate": {"queue": "rank"}, "hubtune.tune_candidate": {"queue": "tune"}},
        task_annotations={
            "hubtune.rank": {"time_limit": settings.rank_time_limit_seconds},
            "hubtune.tune": {"time_limit": settings.tune_time_limit_seconds},
            "hubtune.rank_candidate": {"time_limit": settings.rank_time_limit_seconds},
            "hubtune.tune_candidate": {"time_limit": settings.tune_time_limit_seconds},
        },
        worker_hijack_root_logger=False,
    )
    return app


app = make_celery(get_settings())


def _json_logging(loglevel: int | str = "INFO", **_kwargs: object) -> None:
    """HUBTUNE_LOG_FORMAT=json: the worker's lines as JSON (service.logs), Celery's own included."""
    use_json_logs(loglevel or "INFO")


if get_settings().log_format == "json":  # a receiver of setup_logging replaces Celery's own logging setup
    setup_logging.connect(_json_logging, weak=False)


_worker_main_pid: int | None = None  # the Celery main process, recorded before it forks the pool


@worker_init.connect
def _die_with_serve(**_kwargs: object) -> None:
    """The worker child of `hubtune serve` ends when serve does, even when serve is SIGKILLed (the parent-death
    signal serve set does the same on Linux; this watch covers other systems)."""
    global _worker_main_pid
    _worker_main_pid = os.getpid()
    parent = os.environ.get(PARENT_PID_ENV)
    if parent and parent.isdigit():
        watch_parent(int(parent), kill_own_group)


@worker_process_init.connect
def _die_with_worker(**_kwargs: object) -> None:
    """A pool child ends with the Celery process that forked it, so a SIGKILLed worker leaves no orphan running
    a job. The parent is the pid recorded before the fork, not getppid(): a worker that died between the fork and
    this handler has already handed its child to another parent."""
    parent = _worker_main_pid or os.getppid()
    die_with_parent(signal.SIGKILL, parent)
    watch_parent(parent, lambda: os._exit(1))


@worker_process_init.connect
def _preload_ml_stack(**_kwargs: object) -> None:
    """Import torch and transformers when the pool child starts, not inside the first job's clock."""
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModel, AutoTokenizer  # noqa: F401
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # weight-loading bars would flood the worker log
