"""Jobs: POST /v1/jobs (rank, then optionally tune), GET /v1/jobs[/{id}[/status]], POST /v1/jobs/{id}/cancel.

A job is committed before it is sent to the broker; if the send fails the reconciler sends it later.

A poll is cheap: GET /v1/jobs/{id} and /status carry a strong ETag, and If-None-Match with it is a 304 without a
body, decided from one small read of the job's row (no ranking, no rendering). The ETag is a hash of the row's
version fields (status, phase, stage, progress, attempts, started_at, finished_at): everything else a job shows is
written in the same transaction as one of them changes (results commit with the final status, service/jobs.py),
and the caller's admin flag, since server paths are hidden from other keys (service.api.guards)."""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import JSONResponse
from sqlalchemy import select

from service import jobs as job_states
from service.api.deps import (
    CallerDep,
    OwnerDep,
    PathText,
    SendDep,
    SessionsDep,
    SettingsDep,
    owned_dataset,
    owned_job,
    visible_model,
)
from service.api.pages import OffsetQuery, paginate
from service.api.problems import Problem, problem_responses
from service.api.quotas import check_active_jobs, check_stored_bytes
from service.contract import (
    DEFAULT_LAYERS,
    DEFAULT_METRICS,
    ESTIMATORS,
    SOFTDECAY_RANK_ALPHA,
    TERMINAL,
    JobPhase,
    check_tune_for_dataset,
    estimator_applies,
    resolve_regularizer,
)
from service.db import CATALOG, Dataset, HubModel, Job, iso_utc, ranking_rows, rankings_of
from service.schemas import JobCreate, JobOut, JobStatusOut, Page, RankingEntryOut

router = APIRouter(prefix="/jobs", tags=["jobs"])


def job_out(session: Any, job: Job, rows: list[tuple[Any, Any]] | None = None) -> JobOut:
    """The job as the API shows it; `rows`: its ranking_rows when already read (a page of jobs)."""
    # a ranking entry is its fixed fields and, spread beside them, the details its ranking recorded
    ranking = [RankingEntryOut.model_validate({
        "model": model.name, "model_id": model.id, "rank": entry.rank, "scores": entry.scores,
        "feature_seconds": entry.feature_seconds, **entry.details})
        for entry, model in (ranking_rows(session, job.id) if rows is None else rows)]
    return JobOut(id=job.id, status=job.status, stage=job.stage, progress=job.progress, dataset_id=job.dataset_id,
                  candidates=job.candidates, metrics=job.metrics, options=job.options, tune=job.tune,
                  ranking=ranking, ranking_summary=summary_without_map(job.ranking_summary), tuning=job.tuning,
                  error=job.error,
                  ranked_by=(job.ranking_summary or {}).get("ranked_by"),
                  verdict=(job.ranking_summary or {}).get("verdict"),
                  attempts=job.attempts, created_at=iso_utc(job.created_at), started_at=iso_utc(job.started_at),
                  finished_at=iso_utc(job.finished_at))


def summary_without_map(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ranking summary a job shows: its feature map is served by GET /v1/jobs/{id}/feature-map, so polling a
    job does not carry a few hundred points per model."""
    if summary is None:
        return None
    return {key: value for key, value in summary.items() if key != "feature_map"}


def check_metrics(body: JobCreate, dataset: Dataset) -> None:
    for i, metric in enumerate(body.metrics):
        if metric not in ESTIMATORS:
            raise Problem(422, "unknown metric", f"{metric!r}; known: {', '.join(ESTIMATORS)}", field=f"metrics[{i}]")
        if not estimator_applies(metric, dataset.task):
            raise Problem(422, "metric not defined for this task",
                          f"{metric} is defined for classification only; this dataset is {dataset.task}",
                          field=f"metrics[{i}]")


def resolve_candidates(session: Any, body: JobCreate, dataset: Dataset, who: str) -> list[str]:
    """The model ids to rank: those asked for (each in the shared catalog or the key's own entries, of the
    dataset's modality; duplicates dropped), or every such model of the dataset's modality."""
    if body.candidates is None:
        candidates = list(session.execute(select(HubModel.id).where(
            HubModel.modality == dataset.modality, HubModel.removed_at.is_(None),
            HubModel.owner.in_((CATALOG, who))).order_by(HubModel.created_at)).scalars())
        if not candidates:
            raise Problem(422, "no candidate models", f"no {dataset.modality} model is registered; register "
                          "models with POST /v1/models first", field="candidates")
        return candidates
    if not body.candidates:
        raise Problem(422, "no candidate models", "candidates is empty", field="candidates")
    for i, model_id in enumerate(body.candidates):
        candidate = visible_model(session, model_id, who)
        if candidate is None:  # another key's own entry is as unknown as one never registered
            raise Problem(422, "unknown model", f"no model {model_id}", field=f"candidates[{i}]")
        if candidate.modality != dataset.modality:
            raise Problem(422, f"not an {dataset.modality} model" if dataset.modality == "image"
                          else f"not a {dataset.modality} model",
                          f"{candidate.name} reads {candidate.modality}s; this dataset holds {dataset.modality}s",
                          field=f"candidates[{i}]")
    return list(dict.fromkeys(body.candidates))


MAX_LAYER_INDICES = 64


def job_layers(body: JobCreate, dataset: Dataset) -> str | list[int]:
    """The layers the job reads: the request's, else the default for the dataset's modality (DEFAULT_LAYERS).
    A choice other than "last" reads a text model's hidden states; an image model is read at its last layer only."""
    if body.layers is None:
        return DEFAULT_LAYERS[dataset.modality]
    if body.layers == "last":
        return body.layers
    if dataset.modality != "text":
        raise Problem(422, "layers applies to text models", f"this dataset holds {dataset.modality}s, whose models "
                      "are read at their last layer; leave layers at \"last\"", field="layers")
    if isinstance(body.layers, list) and not 1 <= len(body.layers) <= MAX_LAYER_INDICES:
        raise Problem(422, "invalid layers", f"give 1 to {MAX_LAYER_INDICES} layer indices", field="layers")
    return body.layers


def job_feature_transform(body: JobCreate) -> dict[str, Any]:
    """The options naming the job's feature transform: feature_transform, and softdecay_alpha (its default filled
    in) for softdecay."""
    if body.feature_transform == "none":
        if body.softdecay_alpha is not None:
            raise Problem(422, "softdecay_alpha needs feature_transform softdecay",
                          'set feature_transform to "softdecay", or leave softdecay_alpha out', field="softdecay_alpha")
        return {"feature_transform": "none", "softdecay_alpha": None}
    alpha = SOFTDECAY_RANK_ALPHA if body.softdecay_alpha is None else body.softdecay_alpha
    return {"feature_transform": body.feature_transform, "softdecay_alpha": alpha}


def job_metrics(body: JobCreate) -> list[str]:
    """The estimators the job scores: the request's (duplicates dropped), else DEFAULT_METRICS (successive halving
    ranks by one: the default's first)."""
    if "metrics" in body.model_fields_set:
        return list(dict.fromkeys(body.metrics))
    return [DEFAULT_METRICS[0]] if body.successive_halving is not None else list(DEFAULT_METRICS)


def check_options(body: JobCreate, candidates: list[str], modality: str, task: str | None = None) -> None:
    """Successive halving and tuning, each with what it cannot be combined with."""
    if body.successive_halving is not None:
        if len(job_metrics(body)) != 1:
            raise Problem(422, "successive halving ranks by one metric", "give exactly one metric", field="metrics")
        if body.sample_size is not None:
            raise Problem(422, "sample_size cannot be combined with successive_halving",
                          "successive halving chooses its own samples", field="sample_size")
    if body.tune is not None:
        try:
            resolve_regularizer(body.tune.regularizer.name, body.tune.regularizer.params, where="tune.regularizer")
        except ValueError as exc:
            field_name, _, message = str(exc).partition(": ")
            raise Problem(422, "invalid regularizer setting", message, field=field_name) from exc
        try:
            check_tune_for_dataset(body.tune.model_dump(), modality, task=task)
        except ValueError as exc:
            field_name, _, message = str(exc).partition(": ")
            raise Problem(422, "tuning option does not apply to this dataset", message, field=field_name) from exc
        if body.tune.target is not None and body.tune.target not in candidates:
            raise Problem(422, "tune target is not a candidate", body.tune.target, field="tune.target")
        if body.tune.strategy == "btuning" and "logme" not in job_metrics(body):
            raise Problem(422, "btuning needs LogME", "add 'logme' to metrics", field="tune.strategy")
        if body.sample_size is not None:
            raise Problem(422, "sample_size cannot be combined with tune",
                          "tuning uses the whole dataset; rank on a sample in a separate job", field="sample_size")


def check_ood_dataset(session: Any, body: JobCreate, dataset: Dataset, who: str) -> None:
    """`tune.ood_dataset_id`: another dataset of the caller's, read as the job's dataset is (same modality; for
    text, single texts or pairs alike)."""
    ood_id = body.tune.ood_dataset_id if body.tune is not None else None
    if ood_id is None:
        return
    ood = session.get(Dataset, ood_id)
    if ood is None or ood.owner != who:  # another key's dataset is as unknown as one never uploaded
        raise Problem(404, "dataset not found", f"no dataset {ood_id}", field="tune.ood_dataset_id")
    if ood.id == dataset.id:
        raise Problem(422, "out-of-distribution dataset is the job's own", "give a dataset other than dataset_id",
                      field="tune.ood_dataset_id")
    if ood.modality != dataset.modality:
        raise Problem(422, "out-of-distribution dataset of another modality",
                      f"it holds {ood.modality}s; this job's dataset holds {dataset.modality}s",
                      field="tune.ood_dataset_id")
    if (ood.text_pair_column is None) != (dataset.text_pair_column is None):
        kinds = {True: "single texts", False: "text pairs"}
        raise Problem(422, "out-of-distribution dataset read otherwise",
                      f"it holds {kinds[ood.text_pair_column is None]}; this job's dataset holds "
                      f"{kinds[dataset.text_pair_column is None]}", field="tune.ood_dataset_id")


@router.post("", status_code=202, response_model=JobOut, responses=problem_responses(401, 404, 422, 429, 507))
def create_job(body: JobCreate, sessions: SessionsDep, send: SendDep, who: OwnerDep,
               settings: SettingsDep) -> JSONResponse:
    """Rank the candidates for the dataset (then tune, with `tune`); the job runs on a worker. Location names it."""
    with sessions() as session:
        dataset = owned_dataset(session, body.dataset_id, who)
        check_metrics(body, dataset)
        layers = job_layers(body, dataset)
        candidates = resolve_candidates(session, body, dataset, who)
        check_options(body, candidates, dataset.modality, dataset.task)
        check_ood_dataset(session, body, dataset, who)
        check_active_jobs(session, who, settings)
    if body.tune is not None:  # tuning stores checkpoints
        check_stored_bytes(sessions, who, settings)
    job = Job(owner=who, dataset_id=dataset.id, candidates=candidates, metrics=job_metrics(body),
              options={"sample_size": body.sample_size, "seed": body.seed, "pooling": body.pooling,
                       "layers": layers, **job_feature_transform(body),
                       "successive_halving": body.successive_halving.model_dump()
                       if body.successive_halving else None},
              tune=body.tune.model_dump() if body.tune else None)
    with sessions.begin() as session:
        session.add(job)
    # Sent only after the row is committed. A broker that is down costs at most its timeout here: the job is
    # accepted all the same, marked unsent, and the reconciler sends it once the broker answers.
    job_states.enqueue(sessions, send, job.id, JobPhase.RANK)
    with sessions() as session:
        created = job_out(session, session.get(Job, job.id))
    # Rendered by json.dumps, as this route always was (pydantic's JSON writer spells some floats otherwise:
    # 2e-05 as 0.00002); the body is the JobOut above.
    return JSONResponse(created.model_dump(mode="json"), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("", responses=problem_responses(401, 422))
def list_jobs(sessions: SessionsDep, who: OwnerDep, limit: Annotated[int, Query(ge=1, le=500)] = 50,
              offset: OffsetQuery = 0) -> Page[JobOut]:
    """The key's jobs, newest first."""
    with sessions() as session:
        query = select(Job).where(Job.owner == who).order_by(Job.created_at.desc(), Job.id)
        return paginate(session, query, limit, offset, lambda j: job_out(session, j), Page[JobOut],
                        render_all=lambda jobs: jobs_out(session, jobs))


def jobs_out(session: Any, jobs: list[Job]) -> list[JobOut]:
    """A page of jobs with their rankings read in one query, not one per job."""
    rankings = rankings_of(session, [job.id for job in jobs]) if jobs else {}
    return [job_out(session, job, rankings.get(job.id, [])) for job in jobs]


# The version fields of a job (see the module's docstring): its ETag is a hash of these.
_VERSION = (Job.owner, Job.status, Job.phase, Job.stage, Job.progress, Job.attempts, Job.started_at, Job.finished_at)
_ETAG_HEADER = {"ETag": {"description": "a strong validator of this view of the job: send it back as "
                                        "If-None-Match for a 304 while the job has not changed",
                         "schema": {"type": "string"}}}
_POLL_RESPONSES = {200: {"headers": _ETAG_HEADER},
                   304: {"description": "Not modified: the job is as the If-None-Match ETag saw it (no body)",
                         "headers": _ETAG_HEADER},
                   **problem_responses(401, 404, 422)}
IfNoneMatch = Annotated[str | None, Header(description="an ETag of an earlier answer: 304 while it still holds")]


def job_etag(version: Any, view: str, admin: bool) -> str:
    """The strong ETag of one view ("full" or "status") of a job, as its caller sees it."""
    fields = "\x1f".join(map(str, (*version[1:], view, admin)))
    return '"' + hashlib.sha256(fields.encode()).hexdigest()[:32] + '"'


def _validated(etag: str) -> dict[str, str]:
    """The headers of a poll's answer: its ETag, and no-cache, so a browser (the dashboard's polls) keeps the body
    but asks again each time, with If-None-Match, and gets the 304."""
    return {"ETag": etag, "Cache-Control": "private, no-cache"}


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """If-None-Match's weak comparison (RFC 9110 13.1.2): any listed tag, W/ or not, or "*"."""
    if not if_none_match:
        return False
    listed = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in listed or etag in listed


def _job_version(session: Any, job_id: str, who: str) -> Any:
    """The job's version fields; 404 for one that does not exist or belongs to another key."""
    version = session.execute(select(*_VERSION).where(Job.id == job_id)).one_or_none()
    if version is None or version.owner != who:
        raise Problem(404, "job not found", f"no job {job_id}")
    return version


@router.get("/{job_id}", responses=_POLL_RESPONSES)
def get_job(job_id: PathText, sessions: SessionsDep, caller: CallerDep, response: Response,
            if_none_match: IfNoneMatch = None) -> JobOut:
    """The job with its ranking and tuning results; If-None-Match with its ETag is a 304 while it is unchanged."""
    with sessions() as session:
        if if_none_match:  # the one small read that decides a 304
            etag = job_etag(_job_version(session, job_id, caller.owner), "full", caller.admin)
            if etag_matches(if_none_match, etag):
                return Response(status_code=304, headers=_validated(etag))  # type: ignore[return-value]
        job = owned_job(session, job_id, caller.owner)
        out = job_out(session, job)
    # the ETag of the row the body shows (it may have moved since the version read above)
    response.headers.update(_validated(job_etag([getattr(job, column.key) for column in _VERSION], "full",
                                                caller.admin)))
    return out


@router.get("/{job_id}/status", responses=_POLL_RESPONSES)
def get_job_status(job_id: PathText, sessions: SessionsDep, caller: CallerDep, response: Response,
                   if_none_match: IfNoneMatch = None) -> JobStatusOut:
    """What a poll needs, in one small read: status, phase, stage, progress, error. With an ETag like the job's."""
    with sessions() as session:
        row = session.execute(select(*_VERSION, Job.id, Job.error).where(Job.id == job_id)).one_or_none()
    if row is None or row.owner != caller.owner:
        raise Problem(404, "job not found", f"no job {job_id}")
    etag = job_etag((*row[:len(_VERSION)], row.error is not None), "status", caller.admin)
    if etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=_validated(etag))  # type: ignore[return-value]
    response.headers.update(_validated(etag))
    return JobStatusOut(id=row.id, status=row.status, phase=row.phase, stage=row.stage, progress=row.progress,
                        error=row.error, attempts=row.attempts, finished_at=iso_utc(row.finished_at))


@router.post("/{job_id}/cancel", status_code=202, responses=problem_responses(401, 404, 409, 422))
def cancel_job(job_id: PathText, sessions: SessionsDep, who: OwnerDep) -> JobOut:
    """A queued job is cancelled at once; a running one stops at its next progress report."""
    with sessions() as session:
        job = owned_job(session, job_id, who)
        if job.status in TERMINAL:
            raise Problem(409, "job already finished", f"job {job_id} is {job.status}")
    job_states.request_cancel(sessions, job_id)
    with sessions() as session:
        return job_out(session, session.get(Job, job_id))
