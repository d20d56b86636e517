"""Every route of the API: /healthz, and the resources under /v1."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.routes import checkpoints, datasets, health, jobs, models, regularizers

v1_router = APIRouter(prefix="/v1")
for _resource in (datasets, models, jobs, checkpoints, regularizers):
    v1_router.include_router(_resource.router)

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(v1_router)
