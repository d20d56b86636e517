"""The dashboard in a real browser: Debian's Chromium driven by Playwright, against a real API and worker
(tests/integration/conftest.py's stack, SQLite and the filesystem broker, keys required)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Stack, _make_stack, tiny_hub  # noqa: F401 (a fixture, used by the tests)

CHROMIUM = os.environ.get("HUBTUNE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


# module, not session: sync Playwright runs an event loop in this thread, and asyncio.run fails beside it
@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).is_file():
        if os.environ.get("CI"):
            pytest.fail(f"Chromium is required in CI ({CHROMIUM}): apt-get install -y chromium")
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (Playwright's own download is not used)")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    with playwright_api.sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield launched
        launched.close()


@pytest.fixture
def web_stack(tmp_path: Path) -> Iterator[Stack]:
    yield from _make_stack("sqlite", tmp_path)


@pytest.fixture
def page_for(browser: object) -> Iterator[object]:
    """page_for() -> a page in a fresh browser context (its own session storage: one user), at laptop width."""
    contexts: list[object] = []

    def open_page() -> object:
        context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
        context.set_default_timeout(30_000)
        contexts.append(context)
        page = context.new_page()
        page.errors = []  # uncaught script errors: a test fails on any
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        return page

    yield open_page
    for context in contexts:
        context.close()
