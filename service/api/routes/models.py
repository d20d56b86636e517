"""The model catalog: GET /v1/models, POST /v1/models (a hub repository, a local folder, or a job's tuned
checkpoint), DELETE /v1/models/{id}.

Admins manage the shared catalog every key sees; a user key's additions are its own, seen by it alone. Local
folders are registered by admins only (service.catalog.registrable_folder); a user never sees a server path."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from service.api.deps import CallerDep, PathText, SessionsDep, SettingsDep, current_owner, owned_job
from service.api.pages import OffsetQuery, paginate
from service.api.problems import Problem, problem_responses
from service.artifacts import artifact_store
from service.catalog import ModelFolderProblem, read_model_config, registrable_folder
from service.contract.text import text_error
from service.db import CATALOG, Checkpoint, HubModel, iso_utc, utcnow
from service.schemas import ModelCreate, ModelOut, Page
from service.security import Caller
from service.settings import Settings
from workers.hub import FOLDER_SOURCES, content_revision, hub_allow_refusal, hub_repo_allowed  # no torch

router = APIRouter(prefix="/models", tags=["models"], dependencies=[Depends(current_owner)])


def model_out(m: HubModel, caller: Caller) -> ModelOut:
    folder = m.locator if m.source in FOLDER_SOURCES and caller.admin else None
    return ModelOut(id=m.id, name=m.name, source=m.source, repo_id=m.locator if m.source == "hf" else None,
                    path=folder, revision=m.revision, modality=m.modality, shared=m.owner == CATALOG,
                    model_type=m.model_type, architecture=m.architecture, hidden_size=m.hidden_size,
                    has_source_head=m.has_source_head, created_at=iso_utc(m.created_at))


def checked_config(described: dict[str, Any], field: str = "path") -> dict[str, Any]:
    """What config.json says, if the catalog can record it: model_type and architecture storable strings no longer
    than their columns; a 422 naming `field` otherwise."""
    for key in ("model_type", "architecture"):
        value, limit = described.get(key), getattr(HubModel, key).type.length
        if value is None:
            continue
        if not isinstance(value, str) or text_error(value) or len(value) > limit:
            raise Problem(422, "unreadable config.json", f"its {key} is not a name of at most {limit} characters",
                          field=field)
    return described


@router.get("", responses=problem_responses(401, 422, 429))
def list_models(sessions: SessionsDep, caller: CallerDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                offset: OffsetQuery = 0) -> Page[ModelOut]:
    """The shared catalog and the key's own entries, oldest first."""
    with sessions() as session:
        query = (select(HubModel).where(HubModel.removed_at.is_(None), HubModel.owner.in_((CATALOG, caller.owner)))
                 .order_by(HubModel.created_at, HubModel.id))
        return paginate(session, query, limit, offset, lambda m: model_out(m, caller), Page[ModelOut])


@router.post("", status_code=201, responses={
    200: {"model": ModelOut, "description": "Already registered: the existing entry"},
    **problem_responses(401, 403, 404, 422, 429)})
def register_model(body: ModelCreate, request: Request, sessions: SessionsDep, settings: SettingsDep,
                   caller: CallerDep, response: Response) -> ModelOut:
    """Register a hub repository (recorded as given), a local folder (admins; its config.json read now), or a
    checkpoint of one of the key's jobs. An admin's hub and local entries join the shared catalog; a user's hub
    entries and every checkpoint are the key's own."""
    missing = body.missing_locator()
    if missing:
        raise Problem(422, f"{missing} is required", f"source {body.source!r} needs {missing}", field=missing)
    if body.source == "local":
        folder = registrable_folder(body.path, caller.admin, settings, request.app.state.keyless)
        described = checked_config(read_model_config(folder))
        owner, locator, revision, name = CATALOG, str(folder), content_revision(folder), body.name or folder.name
    elif body.source == "checkpoint":
        folder, described, stored = checkpoint_folder(sessions, settings, body.job_id or "", body.name or "", caller)
        owner, locator, revision, name = caller.owner, stored, content_revision(folder), \
            f"{body.job_id}/{body.name}"
    else:
        patterns = settings.hub_allow_patterns
        if not hub_repo_allowed(body.repo_id or "", patterns):
            raise Problem(403, "hub repository not allowed", hub_allow_refusal(body.repo_id or "", patterns),
                          field="repo_id")
        described = {}
        owner = CATALOG if caller.admin else caller.owner
        locator, revision, name = body.repo_id or "", body.revision or "main", body.name or body.repo_id or ""
    model, created = record_model(sessions, owner, body.source, locator, revision, name, described)
    if not created:
        response.status_code = 200
    return model_out(model, caller)


def checkpoint_folder(sessions: Any, settings: Settings, job_id: str, name: str,
                      caller: Caller) -> tuple[Path, dict[str, Any], str]:
    """The folder of checkpoint `name` of the caller's job `job_id` (a real one: from object storage, the local
    cache's copy), what its config.json says, and where it is stored; 404 for a job of another key, as for one that
    does not exist. Problems name the checkpoint, never its folder."""
    with sessions() as session:
        owned_job(session, job_id, caller.owner)
        checkpoint = session.execute(select(Checkpoint).where(Checkpoint.job_id == job_id,
                                                              Checkpoint.name == name)).scalar_one_or_none()
    if checkpoint is None:
        raise Problem(404, "checkpoint not found", f"no checkpoint {name} in job {job_id}", field="name")
    try:
        folder = artifact_store(settings).local_copy_folder(checkpoint.path)
    except (FileNotFoundError, ValueError):
        folder = None
    if folder is None or not folder.is_dir():
        raise Problem(404, "checkpoint missing", f"checkpoint {name} of job {job_id} is recorded but no longer "
                      "stored", field="name")
    try:
        return folder, checked_config(read_model_config(folder), field="name"), checkpoint.path
    except ModelFolderProblem as exc:
        raise Problem(422, exc.title, f"checkpoint {name} of job {job_id} cannot be ranked: {exc.title}",
                      field="name") from exc


def record_model(sessions: Any, owner: str, source: str, locator: str, revision: str, name: str,
                 described: dict[str, Any]) -> tuple[HubModel, bool]:
    """The entry for this registration and whether it is new: an entry the owner can already see is returned as
    it is; one it removed comes back; otherwise one is added."""
    where = (HubModel.source == source, HubModel.locator == locator, HubModel.revision == revision)
    for _attempt in range(2):  # a concurrent registration of the same entry wins the insert: then read it
        with sessions.begin() as session:
            existing = session.execute(select(HubModel).where(*where, HubModel.owner.in_((CATALOG, owner)))
                                       .order_by(HubModel.owner != owner)).scalars().all()
            live = next((m for m in existing if m.removed_at is None), None)
            if live is not None:
                return live, False
            removed = next((m for m in existing if m.owner == owner), None)
            if removed is not None:
                removed.removed_at, removed.name = None, name
                for key, value in described.items():
                    setattr(removed, key, value)
                return removed, True
        try:
            with sessions.begin() as session:
                model = HubModel(name=name, owner=owner, source=source, locator=locator, revision=revision,
                                 **described)
                session.add(model)
            return model, True  # after the commit: a 201 is only sent for a row that exists
        except IntegrityError:
            continue
    raise Problem(409, "registration conflict", "the same model was registered at the same time; try again")


@router.delete("/{model_id}", status_code=204, response_class=Response,
               responses=problem_responses(401, 403, 404, 422, 429))
def remove_model(model_id: PathText, sessions: SessionsDep, caller: CallerDep) -> Response:
    """Take an entry out of the catalog: admins any, a user key its own. Jobs that ranked it keep their results;
    no new job runs it, nor a queued one."""
    with sessions.begin() as session:
        model = session.get(HubModel, model_id)
        if model is None or model.removed_at is not None or not (caller.admin or model.owner in (CATALOG,
                                                                                                 caller.owner)):
            raise Problem(404, "model not found", f"no model {model_id}")
        if not caller.admin and model.owner != caller.owner:
            raise Problem(403, "catalog entry", "entries of the shared catalog are removed by an admin")
        model.removed_at = utcnow()
    return Response(status_code=204)
