"""Log lines for machines: HUBTUNE_LOG_FORMAT=json writes one JSON object a line (time, level, logger, message,
and the job_id / model_id / phase of what the line is about), in the API and the worker alike, so a log store can
follow one job across processes. The ids come from the record's `extra` or from `log_context`, which tags every
line written inside it on this thread (a job's run, a candidate's features and scores). Torch-free."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

# The fields a line may carry beside its message, from `extra=` or log_context.
ID_FIELDS = ("job_id", "model_id", "phase", "task_id")

_context: ContextVar[dict[str, str]] = ContextVar("hubtune_log_context", default={})  # noqa: B039 (replaced, never mutated)


@contextmanager
def log_context(**fields: str) -> Iterator[None]:
    """Every line logged inside (on this thread) carries these fields, e.g. log_context(job_id=..., phase=...)."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object a line; the message formatted, an exception as its traceback text."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            "process": record.process}
        line.update(_context.get())
        line.update({name: getattr(record, name) for name in ID_FIELDS if getattr(record, name, None) is not None})
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def use_json_logs(level: int | str = logging.INFO) -> None:
    """The root logger writes JSON lines to stderr (its other handlers removed: one format per stream); Python's
    warnings go through it too. (Celery's start-up banner and
    the warnings it gives before logging is set up are printed, not logged, and stay text.)"""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
