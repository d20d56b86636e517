"""Request body caps, enforced while the body is read (pure ASGI: nothing is buffered here).

A declared Content-Length over the route's cap gets 413 at once, before a byte of the body is read; a body without
one (chunked) is counted as it arrives and gets 413 as soon as it passes the cap, so the multipart parser never
spools more than the cap to disk. The 413 closes the connection: the client stops sending what would be discarded.

Caps: the dataset upload (POST /v1/datasets) may carry HUBTUNE_MAX_UPLOAD_BYTES for its file plus FORM_OVERHEAD for
the form around it (the file itself is held to the exact cap as it is copied, service.datasets); every other
request body is held to HUBTUNE_MAX_REQUEST_BYTES (JSON of a job or a model: kilobytes).

Not Starlette's RequestBodyLimitMiddleware (FastAPI's max_body_size): its 413 is text/plain where it answers
itself, names no limit, and a route's cap is fixed at import while these come from the app's settings.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.problems import problem_response
from service.settings import Settings

FORM_OVERHEAD = 1024 * 1024  # multipart boundaries, part headers and the small form fields beside the file
UPLOAD_ROUTES = frozenset({("POST", "/v1/datasets")})


class BodyTooLarge(HTTPException):
    """A request body over its cap: an HTTPException, so FastAPI's body parsing lets it through as it is."""

    def __init__(self, limit: int, setting: str, declared: int | None = None) -> None:
        self.limit, self.setting, self.declared = limit, setting, declared
        size = f"declares {declared} bytes" if declared is not None else f"passed {limit} bytes"
        super().__init__(413, f"the request body {size}; the limit is {limit} bytes ({setting})",
                         headers={"Connection": "close"})


def too_large_response(path: str, exc: BodyTooLarge) -> JSONResponse:
    return problem_response(413, "request body too large", str(exc.detail), path, headers=exc.headers,
                            field="file" if exc.setting == "HUBTUNE_MAX_UPLOAD_BYTES" else None,
                            limit=exc.setting, limit_value=exc.limit)


class BodyLimit:
    """Pure ASGI middleware: each request's body held to the cap of its route (see the module rules)."""

    def __init__(self, app: ASGIApp, request_limit: int, upload_limit: int) -> None:
        self.app, self.request_limit, self.upload_limit = app, request_limit, upload_limit

    def limit_of(self, scope: Scope) -> tuple[int, str]:
        """The cap of this request's route, and the setting it comes from."""
        if (scope["method"], scope["path"].rstrip("/")) in UPLOAD_ROUTES:
            return self.upload_limit + FORM_OVERHEAD, "HUBTUNE_MAX_UPLOAD_BYTES"
        return self.request_limit, "HUBTUNE_MAX_REQUEST_BYTES"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self.limit_of(scope)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:  # refused unread: uvicorn sends no 100 Continue either
            await too_large_response(scope["path"], BodyTooLarge(limit, setting, int(declared)))(scope, receive, send)
            return
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit, setting)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge as exc:  # raised where no exception handler caught it (outside a route)
            if started:
                raise
            await too_large_response(scope["path"], exc)(scope, receive, send)


async def _body_too_large(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BodyTooLarge)
    return too_large_response(request.url.path, exc)


def install_body_limit(app: FastAPI, settings: Settings) -> None:
    """Hold every request body to its cap (HUBTUNE_MAX_UPLOAD_BYTES, HUBTUNE_MAX_REQUEST_BYTES)."""
    app.add_middleware(BodyLimit, request_limit=settings.max_request_bytes, upload_limit=settings.max_upload_bytes)
    app.add_exception_handler(BodyTooLarge, _body_too_large)
