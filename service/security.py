"""API keys (admin and user roles, expiry, revocation), the keyless loopback mode and its Host and Origin checks,
and the server paths a user key never sees. No web framework here: the CLI's `keys` commands import it too."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import secrets
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy import or_, select
from sqlalchemy.orm import sessionmaker

from service.db import ApiKey, utcnow
from service.settings import Settings

# The owner of everything created without a key, in keyless mode.
LOCAL_OWNER = "local"
ADMIN, USER = "admin", "user"
ROLES = (ADMIN, USER)
# What a user key sees where a server path would be.
HIDDEN_PATH = "<server path>"


@dataclass(frozen=True)
class Caller:
    """Who a request acts for: the owner of what it creates (a key's id, or LOCAL_OWNER) and whether it is an admin
    (manages the catalog, registers local folders, sees server paths). The keyless local user is an admin."""

    owner: str
    admin: bool


def hash_key(key: str) -> str:
    """What the api_keys table stores of a key: its SHA-256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    """Whether `host` is localhost or a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def keyless(settings: Settings) -> bool:
    """Whether requests without a key act as the local user: auth "auto" on a loopback bind host only."""
    return settings.auth == "auto" and is_loopback(settings.bind_host)


# ---- keys -----------------------------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d{1,6})([mhdw])")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """"30d", "12h", "90m", "2w" as a timedelta; ValueError for anything else."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is not a duration such as 90m, 12h, 30d or 2w")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def create_key(sessions: sessionmaker, name: str = "", role: str = USER,
               expires_in: timedelta | None = None) -> tuple[str, ApiKey]:
    """A new key (shown once: only its hash is stored) and its row."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    key = "ht_" + secrets.token_urlsafe(32)
    row = ApiKey(name=name, prefix=key[:8], key_hash=hash_key(key), role=role,
                 expires_at=utcnow() + expires_in if expires_in else None)
    with sessions.begin() as session:
        session.add(row)
    return key, row


def find_keys(sessions: sessionmaker, ref: str) -> list[ApiKey]:
    """The keys `ref` names: a key's id, or the prefix `hubtune keys list` shows."""
    with sessions() as session:
        return list(session.execute(select(ApiKey).where(or_(ApiKey.id == ref, ApiKey.prefix == ref))).scalars())


def key_status(key: ApiKey, now: datetime | None = None) -> str:
    """"active", "revoked" or "expired"."""
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= (now or utcnow()):
        return "expired"
    return "active"


def caller_for_key(sessions: sessionmaker, key: str) -> Caller | None:
    """The caller an active key stands for; None for an unknown, revoked or expired key."""
    with sessions() as session:
        found = session.execute(select(ApiKey).where(ApiKey.key_hash == hash_key(key))).scalar_one_or_none()
    if found is None or key_status(found) != "active":
        return None
    return Caller(owner=found.id, admin=found.role == ADMIN)


# ---- keyless mode: who may address the API -----------------------------------------------------------------------

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _host_and_port(authority: str, scheme: str) -> tuple[str, int | None]:
    """("127.0.0.1", 8000) from "127.0.0.1:8000"; IPv6 in brackets; the scheme's port when none is given."""
    parts = urlsplit(f"//{authority}")
    try:
        port = parts.port
    except ValueError:
        port = -1  # not a port: matches nothing
    return (parts.hostname or ""), (port if port is not None else {"http": 80, "https": 443}.get(scheme))


def allowed_host(host_header: str | None, settings: Settings) -> bool:
    """Whether a request addressed to this Host may reach the keyless API: a loopback name or address, or the bind
    host. A page on evil.example whose name was re-pointed to 127.0.0.1 (DNS rebinding) sends Host: evil.example."""
    if not host_header:
        return False
    host, _ = _host_and_port(host_header, "http")
    return is_loopback(host) or host == settings.bind_host.lower()


def allowed_origin(method: str, headers: dict[str, str], scheme: str, settings: Settings) -> bool:
    """Whether a state-changing request comes from the API's own origin: a cross-site form post or fetch carries
    the page's Origin (or Sec-Fetch-Site: cross-site). A request without either (curl, the CLI) is not a browser's."""
    if method not in UNSAFE_METHODS:
        return True
    origin = headers.get("origin")
    if origin is None:
        return headers.get("sec-fetch-site", "") != "cross-site"
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False  # "null" (a sandboxed frame, a file:// page) and anything else that is no web origin
    origin_host, origin_port = _host_and_port(parts.netloc, parts.scheme)
    _, own_port = _host_and_port(headers.get("host", ""), scheme)
    return (is_loopback(origin_host) or origin_host == settings.bind_host.lower()) and origin_port == own_port


# ---- server paths ---------------------------------------------------------------------------------------------

def server_path_pattern(settings: Settings) -> re.Pattern[bytes]:
    """Where a server path could show in a response body: HubTune's state (datasets, checkpoints, the hub cache,
    the local cache of object storage), the model roots, the temporary folder (spooled uploads) and the Python
    installation (tracebacks), each as configured and as resolved. A match stays inside its JSON string (it stops
    before a quote or an escape), so the JSON stays valid."""
    places = {settings.home, settings.home_dir, Path(tempfile.gettempdir()), Path(sys.prefix), Path(sys.base_prefix)}
    places.update(settings.model_root_dirs)
    if settings.remote_artifacts:  # the local cache of object storage: uploads being parsed, copies of checkpoints
        places.add(settings.cache_root_dir)
    places.update(Path(root) for root in settings.model_roots.split(os.pathsep) if root.strip())
    prefixes = {str(place.expanduser()).rstrip("/") for place in places} | {
        str(place.expanduser().resolve()).rstrip("/") for place in places}
    prefixes = {p for p in prefixes if p.count("/") >= 1 and len(p) > 1}  # never "/" itself: it is in every path
    alternatives = b"|".join(re.escape(p.encode()) for p in sorted(prefixes, key=len, reverse=True))
    # the rest of the path: up to a quote, whitespace or an escape, not ending on punctuation ("...: truncated")
    return re.compile(rb"(?:" + alternatives + rb")(?![\w.-])(?:[^\"\s\\]*[^\"\s\\:;,.)\]'}>])?")


def hide_server_paths(body: bytes, pattern: re.Pattern[bytes]) -> bytes:
    """`body` (JSON) with every server path replaced by HIDDEN_PATH."""
    return pattern.sub(HIDDEN_PATH.encode(), body)
