"""The candidate lease state machine of fanned-out rank jobs (service/candidates.py), on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import update

from service import candidates as cs
from service import jobs as job_states
from service.contract import CANDIDATE_TRANSITIONS, CandidateStatus
from service.db import Job, session_factory
from service.migrate import upgrade
from tests.unit.test_job_states import scratch_database, seed_job

MODELS = ["m0", "m1", "m2", "m3", "m4"]


@pytest.fixture(params=["sqlite", "postgres"])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator:
    with scratch_database(request.param, tmp_path) as url:
        upgrade(url)
        factory = session_factory(url)
        seed_job(factory, MODELS)
        assert job_states.claim(factory, "j1", "rank", "coordinator", 60)
        cs.open_candidates(factory, "j1", cs.RANK_STEP, MODELS)
        yield factory
        factory.kw["bind"].dispose()


def claim(sessions, token: str, lease: float = 60, max_attempts: int = 3, **which: str) -> str | None:  # type: ignore[no-untyped-def]
    claimed = cs.claim_candidate(sessions, "j1", token, f"host:{token}", lease, max_attempts, **which)
    return None if claimed is None else claimed.model_id


def states(sessions, step: str = cs.RANK_STEP):  # type: ignore[no-untyped-def]
    return cs.candidate_states(sessions, "j1", step)


def statuses(sessions) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {c.model_id: c.status.value for c in states(sessions)}


def test_candidates_are_claimed_in_the_jobs_order_and_each_once(sessions) -> None:
    assert [claim(sessions, f"w{i}") for i in range(6)] == [*MODELS, None]
    assert set(statuses(sessions).values()) == {"running"}
    assert [c.worker for c in states(sessions)] == [f"host:w{i}" for i in range(5)]


def test_racing_workers_claim_every_candidate_exactly_once(sessions) -> None:
    claimed: list[str | None] = []
    barrier = threading.Barrier(8)

    def worker(index: int) -> None:
        barrier.wait()
        while (model := claim(sessions, f"t{index}")) is not None:
            claimed.append(model)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(claimed) == MODELS


def test_nothing_is_claimed_for_a_job_that_is_cancelled_or_not_running(sessions) -> None:
    job_states.request_cancel(sessions, "j1")
    assert claim(sessions, "w") is None
    with sessions.begin() as session:
        session.execute(update(Job).values(cancel_requested=False, status="succeeded"))
    assert claim(sessions, "w") is None


def test_an_expired_candidate_is_taken_over_and_its_old_owner_loses_every_write(sessions) -> None:
    assert claim(sessions, "old", lease=0.05) == "m0"
    time.sleep(0.1)
    assert claim(sessions, "new") == "m0"
    assert not cs.renew_candidate(sessions, "j1", "m0", "old", 60)
    with pytest.raises(job_states.LeaseLost):
        cs.report_candidate(sessions, "j1", "m0", "old", 0.5)
    with pytest.raises(job_states.LeaseLost):
        cs.finish_candidate(sessions, "j1", "m0", "old", CandidateStatus.SCORED, {"scores": {}})
    cs.finish_candidate(sessions, "j1", "m0", "new", CandidateStatus.SCORED, {"scores": {"logme": 1.5}})
    state = states(sessions)[0]
    assert (state.status, state.attempts, state.worker, state.record) == ("scored", 2, "host:new",
                                                                          {"scores": {"logme": 1.5}})


def test_a_candidate_whose_workers_keep_dying_is_failed_with_its_reason(sessions) -> None:
    for attempt in range(2):
        assert claim(sessions, f"w{attempt}", lease=0.01, max_attempts=2) == "m0"
        time.sleep(0.05)
    assert claim(sessions, "w-last", max_attempts=2) == "m1"  # m0 is given up, m1 is next
    m0 = states(sessions)[0]
    assert m0.status == "failed" and "died 2 times" in m0.record["details"]["error"]


def test_a_released_candidate_is_queued_again_without_counting_the_attempt(sessions) -> None:
    assert claim(sessions, "w") == "m0"
    cs.release_candidate(sessions, "j1", "m0", "w")
    state = states(sessions)[0]
    assert (state.status, state.attempts) == ("queued", 0)
    assert claim(sessions, "w2") == "m0"


def test_progress_reports_surface_the_jobs_cancellation(sessions) -> None:
    assert claim(sessions, "w") == "m0"
    cs.report_candidate(sessions, "j1", "m0", "w", 0.4)
    assert states(sessions)[0].progress == pytest.approx(0.4)
    job_states.request_cancel(sessions, "j1")
    with pytest.raises(job_states.JobCancelled):
        cs.report_candidate(sessions, "j1", "m0", "w", 0.5)


def test_reopening_keeps_done_candidates_and_drops_removed_models(sessions) -> None:
    assert claim(sessions, "w") == "m0"
    cs.finish_candidate(sessions, "j1", "m0", "w", CandidateStatus.SCORED, {"scores": {"logme": 1.0}})
    cs.open_candidates(sessions, "j1", cs.RANK_STEP, ["m0", "m1", "m2"])  # m3, m4 removed from the catalog since
    assert statuses(sessions) == {"m0": "scored", "m1": "queued", "m2": "queued"}


def test_finishing_as_not_done_is_refused_and_the_transitions_table_names_every_change(sessions) -> None:
    assert claim(sessions, "w") == "m0"
    with pytest.raises(ValueError):
        cs.finish_candidate(sessions, "j1", "m0", "w", CandidateStatus.RUNNING, {})
    assert {target for _, target in CANDIDATE_TRANSITIONS.values()} == set(CandidateStatus)


def test_steps_are_apart_and_a_phase_claims_only_its_own_steps(sessions) -> None:
    cs.open_candidates(sessions, "j1", cs.halving_step(1), ["m3", "m1"])
    cs.open_candidates(sessions, "j1", cs.TUNE_STEP, ["m2"])
    assert claim(sessions, "t", phase="tune") == "m2"
    assert claim(sessions, "t2", phase="tune") is None
    assert claim(sessions, "h", step=cs.halving_step(1)) == "m3"
    rank_claims = [claim(sessions, f"r{i}", phase="rank") for i in range(7)]
    assert sorted(filter(None, rank_claims)) == sorted([*MODELS, "m1"]) and rank_claims[-1] is None
    assert [c.model_id for c in states(sessions, cs.halving_step(1))] == ["m3", "m1"]
    assert cs.step_phase(cs.halving_step(1)) == "rank" and cs.step_phase(cs.TUNE_STEP) == "tune"
    assert [cs.halving_round_of(s) for s in (cs.halving_step(12), cs.RANK_STEP, cs.TUNE_STEP)] == [12, None, None]
