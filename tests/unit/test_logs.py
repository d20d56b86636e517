"""JSON logs (issue 20): HUBTUNE_LOG_FORMAT=json writes one object a line carrying the ids of the job and the
candidate a line is about, in the API and the worker; Celery sends task events where the broker can carry them."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from service.app import create_app
from service.cli import worker_command
from service.logs import JsonFormatter, log_context
from service.settings import Settings
from workers.celery_app import make_celery

REPO = Path(__file__).resolve().parents[2]


class Lines(logging.Handler):
    """Keeps the JSON lines of the records it sees."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def lines() -> list[dict]:
    handler = Lines()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler.lines
    root.removeHandler(handler)
    root.setLevel(level)


def test_json_lines_carry_extra_ids_context_ids_and_the_traceback(lines: list[dict]) -> None:
    log = logging.getLogger("hubtune.test")
    log.warning("plain %s", "text")
    with log_context(job_id="j1", phase="rank"):
        with log_context(model_id="m1"):
            log.info("inside the candidate")
        log.info("after the candidate")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed", extra={"model_id": "m2"})
    log.info("after the job")
    plain, candidate, after_candidate, failed, after_job = lines
    assert plain["message"] == "plain text" and plain["level"] == "WARNING" and plain["logger"] == "hubtune.test"
    assert plain["time"].endswith("+00:00") and "job_id" not in plain
    assert (candidate["job_id"], candidate["phase"], candidate["model_id"]) == ("j1", "rank", "m1")
    assert after_candidate["job_id"] == "j1" and "model_id" not in after_candidate
    assert failed["model_id"] == "m2" and "ValueError: boom" in failed["exc_info"]
    assert "job_id" not in after_job


def test_the_runners_lines_carry_the_job_id_and_phase(lines: list[dict], tmp_path: Path) -> None:
    from workers.runner import run_phase

    settings = Settings(home=tmp_path / "home")
    create_app(settings, send=lambda *a: None, run_reconciler=False)  # migrated
    job_id = uuid.uuid4().hex
    assert run_phase(job_id, "rank", settings) == "skipped"  # no such job: one line says it was not claimable
    runner = [line for line in lines if line["logger"] == "hubtune.runner"]
    assert runner and runner[0]["job_id"] == job_id and runner[0]["phase"] == "rank"
    assert "not claimable" in runner[0]["message"]


def _signal_receivers(log_format: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBTUNE_")}
    env.update(HUBTUNE_LOG_FORMAT=log_format, PYTHONPATH=str(REPO))
    code = ("import logging, workers.celery_app; from celery.signals import setup_logging; "
            "setup_logging.send(sender=None, loglevel='INFO', logfile=None, format='', colorize=False); "
            "logging.getLogger('hubtune.runner').info('hello', extra={'job_id': 'j9'})")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_the_worker_logs_json_when_asked() -> None:
    line = json.loads(_signal_receivers("json").strip().splitlines()[-1])
    assert line["message"] == "hello" and line["job_id"] == "j9" and line["logger"] == "hubtune.runner"
    assert "hello" not in _signal_receivers("text")  # Celery's own setup (not run here) stays in text mode


def test_celery_task_events_where_the_broker_has_a_fanout_exchange(tmp_path: Path) -> None:
    redis = make_celery(Settings(home=tmp_path / "a", broker_url="redis://127.0.0.1:6379/11")).conf
    assert redis.worker_send_task_events and redis.task_send_sent_event
    filesystem = make_celery(Settings(home=tmp_path / "b")).conf
    assert not filesystem.worker_send_task_events and not filesystem.task_send_sent_event
    assert "--without-heartbeat" not in worker_command(heartbeat=True)  # Flower sees a Redis worker online
    assert "--without-heartbeat" in worker_command()
