"""What the routes depend on, read from the app's state (service.app sets it): the settings, the session factory,
the broker sender, and the owner the request's API key stands for. Also the lookups of a row the owner owns."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import AfterValidator
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from service.api.problems import Problem
from service.contract.text import checked_text
from service.db import ApiKey, Dataset, Job
from service.jobs import SendTask
from service.security import LOCAL_OWNER, hash_key
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


def current_owner(request: Request, sessions: SessionsDep) -> str:
    """The owner of the request's API key (Authorization: Bearer <key>, or X-API-Key); in keyless mode a request
    without a key acts as the local user. 401 otherwise."""
    header = request.headers.get("authorization", "")
    key = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key")
    if not key:
        if request.app.state.keyless:
            return LOCAL_OWNER
        raise Problem(401, "API key required", "send Authorization: Bearer <key> (create one with "
                      "`hubtune keys create`)", headers={"WWW-Authenticate": "Bearer"})
    with sessions() as session:
        found = session.execute(select(ApiKey).where(ApiKey.key_hash == hash_key(key),
                                                     ApiKey.revoked_at.is_(None))).scalar_one_or_none()
    if found is None:
        raise Problem(401, "invalid API key", "this key is unknown or revoked",
                      headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return found.id


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
