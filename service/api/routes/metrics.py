"""GET /metrics: the process's Prometheus metrics (service.api.metrics), for an admin key or the keyless local
user; any other key is a 403, none a 401."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import CallerDep
from service.api.problems import Problem, problem_responses

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
          "description": "Prometheus text exposition format"},
    **problem_responses(401, 403, 429, 503)})
def metrics(request: Request, caller: CallerDep) -> Response:
    """Jobs by status, queue depth, candidate and job durations, upload bytes, request latency per route."""
    if not caller.admin:
        raise Problem(403, "metrics need an admin key", "GET /metrics is readable with an admin key (or keyless on "
                      "a loopback bind)")
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
