"""ASGI middleware around the whole API: the keyless mode's Host and Origin checks (against DNS rebinding and
cross-site form posts), and the hiding of server paths from every JSON response a user key gets."""

from __future__ import annotations

import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.problems import problem_response
from service.security import allowed_host, allowed_origin, hide_server_paths
from service.settings import Settings

_JSON_TYPES = (b"application/json", b"application/problem+json")
_SHOWN_HOST = 100  # characters of a refused Host header echoed back


class KeylessGuard:
    """In keyless mode (no key needed on a loopback bind), any web page the local user opens can send requests to
    the API: by a name re-pointed to 127.0.0.1 (its Host is that name: 421) or by a cross-site form post or fetch
    (its Origin is that page's: 403). Requests from curl, the CLI or a page of the API's own origin pass."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host")
        refusal = None
        if not allowed_host(host, self.settings):
            refusal = problem_response(421, "host not allowed", "without API keys this server answers requests "
                                       "addressed to a loopback name or address (localhost, 127.0.0.1, [::1]) or its "
                                       f"bind host only, not to {(host or '')[:_SHOWN_HOST]!r}", scope["path"],
                                       field="Host")
        elif not allowed_origin(scope["method"], headers, scope.get("scheme", "http"), self.settings):
            refusal = problem_response(403, "cross-origin request refused", "without API keys this server accepts "
                                       "state-changing requests only from its own origin or from clients that are no "
                                       "web page (curl, the hubtune CLI); this one came from "
                                       f"{headers.get('origin', 'another site')[:_SHOWN_HOST]!r}", scope["path"],
                                       field="Origin")
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


class HideServerPaths:
    """Every JSON response to a caller that is not an admin (or not known to be one: a request refused before its
    key was read) has the server's paths replaced (service.security.hide_server_paths): in job errors, a failed
    candidate's error, a tuning summary's checkpoint folder, an upload's parse error. Other bodies (checkpoint
    files) pass as they are."""

    def __init__(self, app: ASGIApp, pattern: re.Pattern[bytes]) -> None:
        self.app, self.pattern = app, pattern

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "HEAD":  # HEAD: no body, and its length is GET's
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})  # request.state: the caller lands here
        start: Message | None = None
        chunks: list[bytes] = []

        async def hiding_send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                if not content_type.startswith(_JSON_TYPES):
                    await send(message)
                    return
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            caller = state.get("caller")
            if caller is None or not caller.admin:
                body = hide_server_paths(body, self.pattern)
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, hiding_send)
