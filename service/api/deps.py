"""What the routes depend on, read from the app's state (service.app sets it): the settings, the session factory,
the broker sender, and the caller the request's API key stands for (its owner id, whether it is an admin). Also the
lookups of a row the caller owns or may use."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import AfterValidator
from sqlalchemy.orm import sessionmaker

from service.api.problems import Problem
from service.api.quotas import check_rate
from service.contract.text import checked_text
from service.db import CATALOG, Dataset, HubModel, Job
from service.jobs import SendTask
from service.security import LOCAL_OWNER, Caller, caller_for_key
from service.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_sessions(request: Request) -> sessionmaker:
    return request.app.state.sessions


def get_send(request: Request) -> SendTask:
    return request.app.state.send


# A path parameter (an id, a name, a file path): a NUL or a lone surrogate is a 422 naming it, not a database error.
PathText = Annotated[str, AfterValidator(checked_text)]

SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionsDep = Annotated[sessionmaker, Depends(get_sessions)]
SendDep = Annotated[SendTask, Depends(get_send)]


def current_caller(request: Request, sessions: SessionsDep) -> Caller:
    """Who the request's API key (Authorization: Bearer <key>, or X-API-Key) stands for; in keyless mode a request
    without a key acts as the local user, an admin. 401 otherwise; 429 past the key's rate limit. Kept on the
    request's state, where the response's path hiding (service.api.guards) reads it."""
    header = request.headers.get("authorization", "")
    key = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key")
    if not key:
        if not request.app.state.keyless:
            raise Problem(401, "API key required", "send Authorization: Bearer <key> (create one with "
                          "`hubtune keys create`)", headers={"WWW-Authenticate": "Bearer"})
        caller = Caller(owner=LOCAL_OWNER, admin=True)
    else:
        found = caller_for_key(sessions, key)
        if found is None:
            raise Problem(401, "invalid API key", "this key is unknown, revoked or expired",
                          headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        caller = found
    request.state.caller = caller
    check_rate(request.app.state.rate_limiter, caller.owner)
    return caller


CallerDep = Annotated[Caller, Depends(current_caller)]


def current_owner(caller: CallerDep) -> str:
    """The owner of what the request reads and creates (see current_caller)."""
    return caller.owner


OwnerDep = Annotated[str, Depends(current_owner)]


def owned_dataset(session: Any, dataset_id: str, who: str) -> Dataset:
    """The owner's dataset; 404 for one that does not exist or belongs to another key."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.owner != who:
        raise Problem(404, "dataset not found", f"no dataset {dataset_id}")
    return dataset


def owned_job(session: Any, job_id: str, who: str) -> Job:
    """The owner's job; 404 for one that does not exist or belongs to another key."""
    job = session.get(Job, job_id)
    if job is None or job.owner != who:
        raise Problem(404, "job not found", f"no job {job_id}")
    return job


def visible_model(session: Any, model_id: str, who: str) -> HubModel | None:
    """A catalog entry `who` may use: one of the shared catalog or its own, not removed."""
    model = session.get(HubModel, model_id)
    if model is None or model.removed_at is not None or model.owner not in (CATALOG, who):
        return None
    return model
