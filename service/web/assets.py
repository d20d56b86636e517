"""The dashboard's vendored chart library: Plotly's cartesian bundle from the npm registry, pinned by version and
integrity, unpacked into service/web/static/vendor/ (git-ignored). `python -m service.web.assets` fetches it; the
Makefile's install step and the Docker image run that, so nothing is fetched while the service runs."""

from __future__ import annotations

import base64
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

STATIC = Path(__file__).resolve().parent / "static"
VENDOR = STATIC / "vendor"
PLOTLY_PACKAGE = "plotly.js-cartesian-dist-min"
PLOTLY_VERSION = "3.7.0"
# the registry's dist.integrity of that version (`npm view plotly.js-cartesian-dist-min@3.7.0 dist.integrity`)
PLOTLY_INTEGRITY = "sha512-kfQjcAXXByRlskP8JsrlGYRPOvB+kOehZk/qBNewgr9SOMEnBN5nwEnUGOAQ0EEgYdQX51z3VZ81aBnDgSr9Bw=="
PLOTLY_MEMBER = "package/plotly-cartesian.min.js"
PLOTLY_FILE = "plotly-cartesian.min.js"


def vendored(name: str = PLOTLY_FILE) -> Path | None:
    """The vendored file, or None when it was not fetched (the pages then say how to fetch it)."""
    path = VENDOR / name
    return path if path.is_file() else None


def _tarball() -> bytes:
    """The package tarball: through npm when it is installed, else from the registry's tarball URL."""
    spec = f"{PLOTLY_PACKAGE}@{PLOTLY_VERSION}"
    if shutil.which("npm"):
        with tempfile.TemporaryDirectory() as folder:
            done = subprocess.run(["npm", "pack", spec, "--silent"], cwd=folder, capture_output=True, text=True,
                                  timeout=300)
            if done.returncode == 0:
                return (Path(folder) / done.stdout.strip().splitlines()[-1]).read_bytes()
    url = f"https://registry.npmjs.org/{PLOTLY_PACKAGE}/-/{PLOTLY_PACKAGE}-{PLOTLY_VERSION}.tgz"
    with urllib.request.urlopen(url, timeout=300) as response:  # noqa: S310 (a fixed https URL)
        return response.read()


def fetch(force: bool = False) -> Path:
    """Fetch and verify the chart library unless it is there; its path."""
    target = VENDOR / PLOTLY_FILE
    if target.is_file() and not force:
        return target
    data = _tarball()
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    if integrity != PLOTLY_INTEGRITY:
        raise RuntimeError(f"{PLOTLY_PACKAGE}@{PLOTLY_VERSION}: integrity {integrity} is not the pinned "
                           f"{PLOTLY_INTEGRITY}")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        member = archive.extractfile(PLOTLY_MEMBER)
        if member is None:
            raise RuntimeError(f"{PLOTLY_MEMBER} is not in the package")
        content = member.read()
    VENDOR.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    partial.write_bytes(content)
    partial.replace(target)
    return target


if __name__ == "__main__":
    print(fetch(force="--force" in sys.argv[1:]))
