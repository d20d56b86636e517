"""Run one phase of one job: claim the row, keep its lease alive, read its inputs, call the phase, record the result.

This is the only worker code that touches the database: it reads the job, its dataset, candidates and ranking into
plain data (workers/phases/inputs.py), the phase functions (workers/phases/rank.py, tune.py) compute and return
their results, and those are written here in the same transaction as the final status, guarded by the worker's
token, so a job re-run after a crash ends with one ranking (one set of checkpoints), never two.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as SQLTimeoutError
from sqlalchemy.orm import sessionmaker

from service import candidates as candidate_states
from service import jobs as job_states
from service.artifacts import artifact_store, publish_checkpoint
from service.contract import JobPhase, JobStatus
from service.db import (
    Checkpoint,
    DatabaseTimeouts,
    Dataset,
    HubModel,
    Job,
    RankingEntry,
    ranking_rows,
    session_factory,
    utcnow,
)
from service.logs import log_context
from service.settings import Settings, get_settings
from workers.fanout import CandidateProgress, Heartbeat, Progress, Step, Work, patiently, worker_name
from workers.phases import rank as rank_phase
from workers.phases.inputs import FeatureSettings, RankedCandidate, RankInput, TuneDataset, TuneInput
from workers.pipeline import DatasetSpec, ModelSpec

log = logging.getLogger("hubtune.runner")


class ProgressReporter:
    """Writes stage/progress to the row (throttled), and surfaces cancel requests and lost leases."""

    def __init__(self, sessions: sessionmaker, job_id: str, token: str, heartbeat: Heartbeat,
                 min_interval: float = 0.5) -> None:
        self.sessions, self.job_id, self.token, self.heartbeat = sessions, job_id, token, heartbeat
        self.min_interval = min_interval
        self._last_stage: str | None = None
        self._last_time = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        if self.heartbeat.lost.is_set():
            raise job_states.LeaseLost(self.job_id)
        now = time.monotonic()
        if stage == self._last_stage and now - self._last_time < self.min_interval and fraction < 1.0:
            return
        self._last_stage, self._last_time = stage, now
        try:
            job_states.report_progress(self.sessions, self.job_id, self.token, stage, fraction)
        except (OperationalError, SQLTimeoutError):
            # The database is down or frozen for now: progress is shown, not needed. The work goes on; the heartbeat
            # keeps trying, and the lease covers several beats (the job is re-queued only if it runs out).
            log.warning("job %s: progress not recorded, database unavailable", self.job_id)


def model_spec(model: HubModel) -> ModelSpec:
    """What the pipeline needs of a catalog entry."""
    return ModelSpec(model.id, model.name, model.source, model.locator, model.revision)


def dataset_spec(dataset: Dataset, settings: Settings) -> DatasetSpec:
    """The dataset as a real file: where it is stored, or the worker's cached copy of an object in S3."""
    path = artifact_store(settings).local_copy(dataset.storage_path)
    return DatasetSpec(path=path, task=dataset.task, label_names=dataset.label_names)


def _load(sessions: sessionmaker, job_id: str) -> tuple[Job, Dataset, list[HubModel]]:
    """The job, its dataset and its candidate models that are still in the catalog, in the job's order."""
    with sessions() as session:
        job = session.get(Job, job_id)
        dataset = session.get(Dataset, job.dataset_id)
        models = {m.id: m for m in session.execute(select(HubModel).where(
            HubModel.id.in_(job.candidates), HubModel.removed_at.is_(None))).scalars()}  # removed: not run
        candidates = [models[i] for i in job.candidates if i in models]
    if not candidates:
        raise ValueError("none of the job's candidate models exist any more")
    return job, dataset, candidates


def _rank_input(job: Job, dataset: Dataset, models: list[HubModel], settings: Settings) -> RankInput:
    return RankInput(dataset=dataset_spec(dataset, settings), models=[model_spec(m) for m in models],
                     metrics=job.metrics, options=job.options, features=FeatureSettings.from_settings(settings),
                     bootstrap_samples=settings.bootstrap_samples)


def _rank_work(inputs: RankInput, rows: Any) -> Work:
    """Score one candidate: its record, and its features kept for the assembly when done by the coordinator."""
    models = {m.id: m for m in inputs.models}

    def work(model_id: str, stage: str, report: Progress, where: tuple[float, float]
             ) -> tuple[Any, dict[str, Any], bool]:
        kept, record = rank_phase.score_one(inputs, rows, models[model_id], stage, where, report)
        return kept, record, kept is None

    return work


def _rank_fanned_out(sessions: sessionmaker, job_id: str, inputs: RankInput, progress: ProgressReporter,
                     settings: Settings) -> rank_phase.RankOutcome:
    """Every free worker scores candidates (workers/fanout.py); this one, holding the job's lease, assembles the
    ranking once from every candidate's record and features."""
    rows = rank_phase.job_rows(inputs)
    step = Step(sessions, job_id, candidate_states.RANK_STEP, settings)
    records, kept = step.coordinate([m.id for m in inputs.models], {m.id: m.name for m in inputs.models},
                                    "features", _rank_work(inputs, rows), progress)
    return rank_phase.assemble(inputs, rows, records, progress, known_features=kept)


def _halving_work(inputs: RankInput, examples: Any, tag: str) -> Work:
    models = {m.id: m for m in inputs.models}

    def work(model_id: str, stage: str, report: Progress, where: tuple[float, float]
             ) -> tuple[Any, dict[str, Any], bool]:
        report(stage, where[0])
        record = rank_phase.extract_for_round(inputs, models[model_id], examples, tag)
        return ("error" not in record) or None, record, "error" in record

    return work


def _halving_prefetch(sessions: sessionmaker, job_id: str, inputs: RankInput, progress: ProgressReporter,
                      settings: Settings) -> Any:
    """Successive halving's rounds fanned out: every survivor's features of a round's new rows extracted by any
    free worker into the feature cache; the ranking then reads them from there and decides the cut here."""

    def prefetch(round_index: int, survivors: list[ModelSpec], examples: Any, tag: str,
                 span: tuple[float, float]) -> dict[str, dict[str, Any]]:
        step = Step(sessions, job_id, candidate_states.halving_step(round_index), settings)
        records, _ = step.coordinate([m.id for m in survivors], {m.id: m.name for m in survivors},
                                     f"round {round_index + 1} features", _halving_work(inputs, examples, tag),
                                     progress, span=span)
        return records

    return prefetch


def run_candidate(job_id: str, phase: str, settings: Settings | None = None) -> str:
    """Claim one candidate of a running job's fanned-out step of this phase and do it (any worker; the job's
    coordinator goes on once all are done). Returns what happened, for logs and tests."""
    with log_context(job_id=job_id, phase=phase):
        settings = settings or get_settings()
        sessions = session_factory(settings.sqlalchemy_url, DatabaseTimeouts.from_settings(settings))
        token = uuid.uuid4().hex
        claimed = patiently(lambda: candidate_states.claim_candidate(
            sessions, job_id, token, worker_name(), settings.lease_seconds, settings.max_attempts, phase=phase),
            settings, f"job {job_id}: claiming a candidate")
        if claimed is None:
            return "skipped"
        step = Step(sessions, job_id, claimed.step, settings)
        try:
            work = _candidate_work(sessions, job_id, claimed.step, settings)
        except Exception:
            log.exception("job %s: candidate %s could not be prepared", job_id, claimed.model_id)
            step.release(claimed.model_id, token)
            return "released"
        try:
            kept = step.do(claimed.model_id, token, work, CandidateProgress(sessions, job_id, claimed.model_id, token),
                           f"{claimed.step}: {claimed.model_id}", (0.0, 1.0))
            return "done" if kept is not None else "failed"
        except (job_states.LeaseLost, job_states.JobCancelled):
            log.info("job %s: candidate %s stopped (job cancelled, ended, or the lease lost)", job_id,
                     claimed.model_id)
            return "stopped"
        except Exception:
            log.exception("job %s: candidate %s failed", job_id, claimed.model_id)
            return "released"


def _candidate_work(sessions: sessionmaker, job_id: str, step: str, settings: Settings) -> Work:
    """What a candidate of this step is: its job's inputs read here, as the coordinator read them."""
    round_index = candidate_states.halving_round_of(step)
    if step == candidate_states.RANK_STEP or round_index is not None:
        inputs = _rank_input(*_load(sessions, job_id), settings)
        if round_index is None:
            return _rank_work(inputs, rank_phase.job_rows(inputs))
        return _halving_work(inputs, *rank_phase.halving_round(inputs, round_index))
    if step == candidate_states.TUNE_STEP:  # _tune_input reads the job itself
        from workers.phases import tune as tune_phase

        tune_input = _tune_input(sessions, job_id, settings)
        return _tune_work(tune_input, tune_phase.plan_tune(tune_input, lambda stage, fraction: None), settings)
    raise ValueError(f"no work for step {step!r}")


def _rank(sessions: sessionmaker, job_id: str, token: str, progress: ProgressReporter, settings: Settings) -> None:
    job, dataset, models = _load(sessions, job_id)
    inputs = _rank_input(job, dataset, models, settings)
    if job.options.get("successive_halving"):  # each round's features by every free worker, then its cut here
        outcome = rank_phase.run_rank(inputs, progress, prefetch=_halving_prefetch(sessions, job_id, inputs,
                                                                                   progress, settings))
    else:
        outcome = _rank_fanned_out(sessions, job_id, inputs, progress, settings)
    tuning_next = job.tune is not None
    with sessions.begin() as session:
        session.execute(delete(RankingEntry).where(RankingEntry.job_id == job.id))
        session.add_all(RankingEntry(job_id=job.id, model_id=r.model_id, rank=r.rank, scores=r.scores,
                                     details=r.details, feature_seconds=r.feature_seconds) for r in outcome.ranking)
        if tuning_next:
            job_states.finish(session, job.id, token, status=JobStatus.QUEUED, phase=JobPhase.TUNE,
                              stage="ranked; waiting to tune", progress=0.0, ranking_summary=outcome.summary)
        else:
            job_states.finish(session, job.id, token, status=JobStatus.SUCCEEDED, stage="done", progress=1.0,
                              finished_at=utcnow(), ranking_summary=outcome.summary)
    if tuning_next:
        from workers.celery_app import make_celery

        job_states.enqueue(sessions, job_states.celery_sender(make_celery(settings)), job.id, JobPhase.TUNE)


def _tune_input(sessions: sessionmaker, job_id: str, settings: Settings) -> TuneInput:
    job, dataset, _ = _load(sessions, job_id)
    with sessions() as session:
        rows = ranking_rows(session, job_id)
        ranking = [RankedCandidate(model_spec(model), entry.scores, (entry.details or {}).get("error") or None)
                   for entry, model in rows]
    # the columns say what the checkpoint reads: a text, a pair for tokenizer(text, text_pair), or images
    columns = {"text": dataset.text_column, "text_pair": dataset.text_pair_column, "image": dataset.image_column,
               "label": dataset.label_column}
    if dataset.serialization:  # a table: the text is each row's sentence of these columns (service.lift)
        columns["features"] = ", ".join(dataset.serialization["feature_columns"])
    data = TuneDataset(spec=dataset_spec(dataset, settings), sha256=dataset.sha256,
                       columns={k: v for k, v in columns.items() if v is not None})
    return TuneInput(job_id=job.id, spec=job.tune or {}, pooling=job.options.get("pooling", "mean"), dataset=data,
                     ranking=ranking, features=FeatureSettings.from_settings(settings),
                     job_dir=settings.jobs_dir / job.id, ood=_ood_dataset(sessions, job, settings))


def _ood_dataset(sessions: sessionmaker, job: Job, settings: Settings) -> DatasetSpec | None:
    """The dataset `tune.ood_dataset_id` names (checked by the API when the job was created), if any."""
    ood_id = (job.tune or {}).get("ood_dataset_id")
    if not ood_id:
        return None
    with sessions() as session:
        ood = session.get(Dataset, ood_id)
    if ood is None:
        raise ValueError(f"tune.ood_dataset_id: the dataset {ood_id} no longer exists")
    return dataset_spec(ood, settings)


def _tune_work(job: TuneInput, plan: Any, settings: Settings) -> Work:
    """Train one target and store its checkpoint (in object storage: uploaded whole, its manifest last, before
    anything names it); the record says where. `where` (start, width) splits the progress scale in equal parts:
    the target's position among them."""
    from workers.phases import tune as tune_phase

    store = artifact_store(settings)

    def work(model_id: str, stage: str, report: Progress, where: tuple[float, float]
             ) -> tuple[Any, dict[str, Any], bool]:
        start, width = where
        position = (round(start / width), round(1 / width))
        name, summary = tune_phase.tune_target(job, plan, model_id, position, report)
        summary["worker"] = worker_name()
        checkpoint = tune_phase.checkpoint_record(job, name, summary)
        path = publish_checkpoint(store, job.job_id, name, checkpoint.path)
        if store.remote:  # uploaded: this worker's copy and training state are of no more use
            shutil.rmtree(checkpoint.path, ignore_errors=True)
            shutil.rmtree(job.job_dir / "train-state" / name, ignore_errors=True)
        record = {"name": name, "model_id": model_id, "path": path, "files": checkpoint.files, "summary": summary}
        return record, record, False

    return work


def _tune(sessions: sessionmaker, job_id: str, token: str, progress: ProgressReporter, settings: Settings) -> None:
    from workers.phases import tune as tune_phase
    from workers.tuning import TuningCancelled

    job = _tune_input(sessions, job_id, settings)
    try:
        plan = tune_phase.plan_tune(job, progress)
        work, targets = _tune_work(job, plan, settings), plan.target_ids
        if job.spec["strategy"] == "finetune" and len(targets) > 1:  # independent runs: one per free worker
            records, _ = Step(sessions, job_id, candidate_states.TUNE_STEP, settings).coordinate(
                targets, {m: plan.by_id[m].model.name for m in targets}, "tuning", work, progress, span=(0.0, 1.0))
            done = [records[model_id] for model_id in targets]
        else:
            done = [work(model_id, "", progress, (index / len(targets), 1 / len(targets)))[1]
                    for index, model_id in enumerate(targets)]
    except TuningCancelled as exc:
        raise job_states.JobCancelled(job_id) from exc
    with sessions.begin() as session:
        session.execute(delete(Checkpoint).where(Checkpoint.job_id == job_id))
        session.add_all(Checkpoint(job_id=job_id, name=c["name"], model_id=c["model_id"], path=c["path"],
                                   files=c["files"]) for c in done)
        job_states.finish(session, job_id, token, status=JobStatus.SUCCEEDED, stage="done", progress=1.0,
                          tuning={"strategy": job.spec["strategy"], "models": [c["summary"] for c in done]},
                          finished_at=utcnow())
    if artifact_store(settings).remote:  # the worker's working copy (training state, results) is of no more use
        shutil.rmtree(settings.jobs_dir / job_id, ignore_errors=True)


def run_phase(job_id: str, phase: str, settings: Settings | None = None) -> str:
    """Claim and run one phase ("rank" or "tune") of a job. Returns what happened, for logs and tests. Every line
    logged meanwhile carries the job's id and phase (service.logs)."""
    with log_context(job_id=job_id, phase=str(phase)):
        return _run_phase(job_id, phase, settings)


def _run_phase(job_id: str, phase: str, settings: Settings | None) -> str:
    settings = settings or get_settings()
    sessions = session_factory(settings.sqlalchemy_url, DatabaseTimeouts.from_settings(settings))
    token = uuid.uuid4().hex
    if not job_states.claim(sessions, job_id, phase, token, settings.lease_seconds):
        log.info("job %s (%s) not claimable: already taken, finished or cancelled", job_id, phase)
        return "skipped"
    began = time.monotonic()
    log.info("job %s: %s phase claimed", job_id, phase)
    renew = lambda: job_states.renew_lease(sessions, job_id, token, settings.lease_seconds)  # noqa: E731
    with Heartbeat(renew, job_id, settings) as heartbeat:
        progress = ProgressReporter(sessions, job_id, token, heartbeat)
        try:
            run = _rank if phase == JobPhase.RANK else _tune
            run(sessions, job_id, token, progress, settings)
            log.info("job %s: %s phase done in %.1f s", job_id, phase, time.monotonic() - began)
            return "done"
        except job_states.LeaseLost:
            log.warning("job %s: lease lost to another worker; dropping this attempt", job_id)
            return "lease-lost"
        except job_states.JobCancelled:
            _end(sessions, job_id, token, status=JobStatus.CANCELLED, stage="cancelled")
            return "cancelled"
        except Exception as exc:
            log.exception("job %s failed", job_id)
            _end(sessions, job_id, token, status=JobStatus.FAILED, stage="failed", error=f"{type(exc).__name__}: {exc}")
            return "failed"


def _end(sessions: sessionmaker, job_id: str, token: str, **values: Any) -> None:
    try:
        with sessions.begin() as session:
            job_states.finish(session, job_id, token, finished_at=utcnow(), **values)
    except job_states.LeaseLost:
        log.warning("job %s: could not record %s, lease lost", job_id, values.get("status"))
