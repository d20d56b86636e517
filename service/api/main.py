"""Every route of the API: /healthz, and the resources under /v1."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.problems import problem_responses
from service.api.routes import checkpoints, datasets, health, jobs, models, regularizers, views

# Every route under /v1 reads the database, so any of them answers 503 while it is down.
v1_router = APIRouter(prefix="/v1", responses=problem_responses(503))
for _resource in (datasets, models, jobs, checkpoints, regularizers, views):
    v1_router.include_router(_resource.router)

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(v1_router)
