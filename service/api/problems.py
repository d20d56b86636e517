"""RFC 9457 problem details: every error the API returns is application/problem+json naming the field (and the
row, or the file inside a zip) at fault, and /openapi.json documents it so."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.artifacts import ArtifactStoreUnavailable
from service.catalog import ModelFolderProblem
from service.tabular import DatasetProblem

log = logging.getLogger("hubtune.api")

PROBLEM_MEDIA_TYPE = "application/problem+json"
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class Problem(Exception):
    """An RFC 9457 problem: rendered as application/problem+json with the field or row at fault."""

    def __init__(self, status: int, title: str, detail: str = "", field: str | None = None, row: int | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail or title)
        self.status, self.title, self.detail, self.field, self.row = status, title, detail, field, row
        self.headers = headers  # e.g. WWW-Authenticate on a 401
        self.extra = extra  # further members of the body


class FieldError(BaseModel):
    field: str | None
    message: str


class ProblemDetail(BaseModel):
    """An error (RFC 9457). Members that do not apply are left out."""

    model_config = ConfigDict(extra="allow")
    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str
    field: str | None = None
    row: int | None = None
    path: str | None = None
    errors: list[FieldError] | None = None


_DESCRIPTIONS = {
    400: "The request body could not be parsed (a malformed multipart upload)",
    401: "No API key, or an unknown, revoked or expired one",
    403: "Not allowed for this key (a local folder, a hub repository outside HUBTUNE_HUB_ALLOW, a catalog entry)",
    404: "Not found, or owned by another key",
    409: "The job has already finished",
    413: "The upload is larger than HUBTUNE_MAX_UPLOAD_BYTES",
    415: "Not a file type HubTune reads",
    416: "The Range asked lies outside the file",
    422: "Invalid request: `field` (and `row`, `path` for a dataset) names what is wrong",
    429: "Past the key's request rate or active-job limit (`limit` names it); Retry-After says when to ask again",
    503: "The database did not answer within its timeout (or refused the connection): retry after Retry-After "
         "seconds",
    507: "The key's stored bytes would pass HUBTUNE_KEY_MAX_BYTES (`limit` names it)",
}
# Every response of these carries the header.
_HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}},
    503: {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}},
}
# Seconds a client is asked to wait when a dependency is down: about one reconnect attempt's worth.
RETRY_AFTER_SECONDS = 5


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that can fail with these statuses."""
    return {status: {"model": ProblemDetail, "description": _DESCRIPTIONS[status],
                     **({"headers": _HEADERS[status]} if status in _HEADERS else {})} for status in statuses}


class ProblemResponse(JSONResponse):
    """problem+json written as ASCII JSON: a problem may echo what the request sent (a field name, a column), and a
    lone surrogate in it must come back escaped, not fail to encode."""

    media_type = PROBLEM_MEDIA_TYPE

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


def problem_response(status: int, title: str, detail: str, instance: str, headers: dict[str, str] | None = None,
                     **members: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, "instance": instance}
    body.update({k: v for k, v in members.items() if v is not None})
    return ProblemResponse(body, status_code=status, headers=headers)


async def _problem(request: Request, exc: Problem) -> JSONResponse:
    return problem_response(exc.status, exc.title, exc.detail, str(request.url.path), headers=exc.headers,
                            field=exc.field, row=exc.row, **exc.extra)


async def _dataset_problem(request: Request, exc: DatasetProblem) -> JSONResponse:
    return problem_response(exc.status, exc.title, exc.detail, str(request.url.path), field=exc.field, row=exc.row,
                            path=exc.path, limit=exc.limit, limit_value=exc.limit_value)


async def _model_folder_problem(request: Request, exc: ModelFolderProblem) -> JSONResponse:
    return problem_response(exc.status, exc.title, exc.detail, str(request.url.path), field=exc.field)


def field_name(loc: tuple[Any, ...] | list[Any]) -> str:
    """A pydantic error location as the API names fields: tune.regularizer.params.alpha, candidates[0]."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "form", "header", "cookie"):
        parts = parts[1:]  # where FastAPI read it; a field may itself be named "path"
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [{"field": field_name(e["loc"]), "message": e["msg"]} for e in exc.errors()]
    first = errors[0] if errors else {"field": None, "message": "invalid request"}
    return problem_response(422, "invalid request", f"{first['field']}: {first['message']}", str(request.url.path),
                            field=first["field"], errors=errors)


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (404 for no route, 405), as problem+json with their headers; a 405's Allow lists the
    methods of every route at the path (Starlette names only the first route's)."""
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = allowed_methods(request) or headers.get("Allow", "")
    return problem_response(exc.status_code, str(exc.detail), str(exc.detail), str(request.url.path),
                            headers=headers or None)


def allowed_methods(request: Request) -> str:
    """The methods some route of the app answers at the request's path, e.g. "GET, HEAD, POST"."""
    routes = request.app.router.routes
    allowed = [method for method in _METHODS if any(
        route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)]
    return ", ".join(allowed)


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The database refused the connection, did not answer within its timeout, cancelled a statement that ran past
    it, or (SQLite) stayed locked past the busy timeout: the service is unavailable for now, not broken."""
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path,
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return problem_response(503, "database unavailable", "the database did not answer in time or refused the "
                            f"connection; retry in {RETRY_AFTER_SECONDS} s", str(request.url.path),
                            headers={"Retry-After": str(RETRY_AFTER_SECONDS)}, dependency="database")


async def _artifacts_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The object store (HUBTUNE_ARTIFACTS_URL) did not answer or refused: unavailable for now, as a database."""
    log.warning("artifact store unavailable on %s %s: %s", request.method, request.url.path, exc)
    return problem_response(503, "artifact store unavailable", "the object store did not answer or refused the "
                            f"request; retry in {RETRY_AFTER_SECONDS} s", str(request.url.path),
                            headers={"Retry-After": str(RETRY_AFTER_SECONDS)}, dependency="artifacts")


def install_problems(app: FastAPI) -> None:
    """Render every error as problem+json, and document the error responses with that media type."""
    app.add_exception_handler(Problem, _problem)
    app.add_exception_handler(DatasetProblem, _dataset_problem)
    app.add_exception_handler(ModelFolderProblem, _model_folder_problem)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    # OperationalError: refused, timed out, cancelled by statement_timeout, locked; TimeoutError: no pooled
    # connection came free in time (the others are stuck on a frozen server).
    for unavailable in (sqlalchemy.exc.OperationalError, sqlalchemy.exc.TimeoutError):
        app.add_exception_handler(unavailable, _database_unavailable)
    app.add_exception_handler(ArtifactStoreUnavailable, _artifacts_unavailable)
    app.openapi = _problem_openapi(app.openapi)  # type: ignore[method-assign]


def _problem_openapi(generate: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """FastAPI documents every response model as application/json; errors are application/problem+json. A route
    reading a multipart body can also answer 400 (a body the form parser cannot read), and FastAPI's own
    HTTPValidationError never reaches a client: every 422 is a ProblemDetail."""

    def openapi() -> dict[str, Any]:
        schema = generate()  # built once, then cached on the app; the changes below are idempotent
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if "multipart/form-data" in operation.get("requestBody", {}).get("content", {}):
                    responses.setdefault("400", _documented(400))
                for status, response in responses.items():
                    content = response.get("content", {})
                    if status[:1] in ("4", "5") and "application/json" in content:
                        content[PROBLEM_MEDIA_TYPE] = content.pop("application/json")
                    if status[:1] in ("4", "5") and PROBLEM_MEDIA_TYPE in content:
                        content[PROBLEM_MEDIA_TYPE]["schema"] = {"$ref": "#/components/schemas/ProblemDetail"}
        components = schema.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        return schema

    return openapi


def _documented(status: int) -> dict[str, Any]:
    """One problem response as the OpenAPI document spells it."""
    response: dict[str, Any] = {"description": _DESCRIPTIONS[status],
                                "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/"
                                                                                    "ProblemDetail"}}}}
    if status in _HEADERS:
        response["headers"] = _HEADERS[status]
    return response
