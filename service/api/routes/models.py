"""The model catalog: GET /v1/models, POST /v1/models (a hub repository or a local folder)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response
from sqlalchemy import select

from service.api.deps import SessionsDep, current_owner
from service.api.pages import OffsetQuery, paginate
from service.api.problems import Problem, problem_responses
from service.catalog import local_folder, read_model_config
from service.contract.text import text_error
from service.db import HubModel, iso_utc
from service.schemas import ModelCreate, ModelOut, Page
from workers.hub import content_revision  # no torch: a hash of the folder's files

router = APIRouter(prefix="/models", tags=["models"], dependencies=[Depends(current_owner)])


def model_out(m: HubModel) -> ModelOut:
    return ModelOut(id=m.id, name=m.name, source=m.source, repo_id=m.locator if m.source == "hf" else None,
                    path=m.locator if m.source == "local" else None, revision=m.revision, modality=m.modality,
                    model_type=m.model_type, architecture=m.architecture, hidden_size=m.hidden_size,
                    has_source_head=m.has_source_head, created_at=iso_utc(m.created_at))


def checked_config(described: dict[str, Any]) -> dict[str, Any]:
    """What config.json says, if the catalog can record it: model_type and architecture storable strings no longer
    than their columns; a 422 naming `path` otherwise."""
    for key in ("model_type", "architecture"):
        value, limit = described.get(key), getattr(HubModel, key).type.length
        if value is None:
            continue
        if not isinstance(value, str) or text_error(value) or len(value) > limit:
            raise Problem(422, "unreadable config.json", f"its {key} is not a name of at most {limit} characters",
                          field="path")
    return described


@router.get("", responses=problem_responses(401, 422))
def list_models(sessions: SessionsDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                offset: OffsetQuery = 0) -> Page[ModelOut]:
    """Every registered model (the catalog is shared by all keys), oldest first."""
    with sessions() as session:
        query = select(HubModel).order_by(HubModel.created_at, HubModel.id)
        return paginate(session, query, limit, offset, model_out, Page[ModelOut])


@router.post("", status_code=201, responses={
    200: {"model": ModelOut, "description": "Already registered: the existing entry"},
    **problem_responses(401, 422)})
def register_model(body: ModelCreate, sessions: SessionsDep, response: Response) -> ModelOut:
    """Register a hub repository (recorded as given) or a local folder (its config.json read now)."""
    missing = body.missing_locator()
    if missing:
        raise Problem(422, f"{missing} is required", f"source {body.source!r} needs {missing}", field=missing)
    if body.source == "local":
        folder = local_folder(body.path)
        described = checked_config(read_model_config(folder))
        locator, revision, name = str(folder), content_revision(folder), body.name or folder.name
    else:
        described = {}
        locator, revision, name = body.repo_id or "", body.revision or "main", body.name or body.repo_id or ""
    with sessions.begin() as session:
        existing = session.execute(select(HubModel).where(
            HubModel.source == body.source, HubModel.locator == locator, HubModel.revision == revision,
        )).scalar_one_or_none()
        if existing is not None:
            response.status_code = 200
            return model_out(existing)
        model = HubModel(name=name, source=body.source, locator=locator, revision=revision, **described)
        session.add(model)
    return model_out(model)  # after the commit: a 201 is only sent for a row that exists
