"""Every route of the API: /healthz, the resources under /v1, and the dashboard's pages (service.web)."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.problems import problem_responses
from service.api.routes import checkpoints, datasets, health, jobs, metrics, models, regularizers, views
from service.web import routes as web_routes

# Every route under /v1 reads the database, so any of them answers 503 while it is down.
v1_router = APIRouter(prefix="/v1", responses=problem_responses(503))
for _resource in (datasets, models, jobs, checkpoints, regularizers, views):
    v1_router.include_router(_resource.router)

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(metrics.router)  # reads the database; a 503 while it is down
api_router.include_router(v1_router)
api_router.include_router(web_routes.router)  # the dashboard's pages, on the same port
