"""workers/fanout.py's patience with the database: the coordinator's bookkeeping between candidates waits out an
outage of up to a lease instead of failing the job (the outage itself: tests/integration/test_outages.py)."""

from __future__ import annotations

import time

import pytest
from sqlalchemy.exc import OperationalError

from service.settings import Settings
from workers.fanout import patiently


def _down() -> OperationalError:
    return OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))


def test_a_call_is_tried_again_while_the_database_is_down() -> None:
    outcomes: list[object] = [_down(), _down(), "done"]

    def call() -> object:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    began = time.monotonic()
    assert patiently(call, Settings(lease_seconds=30), "test") == "done"
    assert outcomes == [] and time.monotonic() - began < 5  # 0.5 s, then 1 s


def test_an_outage_longer_than_a_lease_is_raised() -> None:
    def call() -> None:
        raise _down()

    began = time.monotonic()
    with pytest.raises(OperationalError):
        patiently(call, Settings(lease_seconds=1), "test")
    assert 1 <= time.monotonic() - began < 4


def test_other_errors_are_not_retried() -> None:
    calls: list[int] = []

    def call() -> None:
        calls.append(1)
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError):
        patiently(call, Settings(lease_seconds=30), "test")
    assert calls == [1]
