"""GET /healthz: the API is up and its database answers."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from service.api.deps import SessionsDep
from service.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(sessions: SessionsDep) -> Health:
    with sessions() as session:
        session.execute(select(1))
    return Health(status="ok")
