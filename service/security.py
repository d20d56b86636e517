"""API keys and the keyless loopback mode. Standard library only: the CLI's `keys` commands import it too."""

from __future__ import annotations

import hashlib
import ipaddress

from service.settings import Settings

# The owner of everything created without a key, in keyless mode.
LOCAL_OWNER = "local"


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
