"""Regenerate the dashboard's screenshots in docs/: the job page's ranking chart, feature maps and tuning curves.

    python docs/screenshots.py                      # a throwaway stack on tiny models (tests/tiny_models.py)
    python docs/screenshots.py --url http://127.0.0.1:8000 --job JOB_ID [--key KEY]   # a job of a running service

Needs Debian's Chromium (apt-get install chromium) and Playwright (the test extra)."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHOTS = {"ranking-section": "dashboard-ranking.png", "map-section": "dashboard-feature-maps.png",
         "tuning-section": "dashboard-tuning.png"}


def tiny_job(home: Path) -> tuple[object, object, str, str]:
    """A stack (API + worker) on tiny models with one rank-then-tune job done: (its generator, which stops it when
    closed; the stack; the job id; the key)."""
    from tests.integration.conftest import _make_stack
    from tests.integration.test_http_flow import topic_csv, upload, wait_for
    from tests.tiny_models import make_tiny_bert, make_tiny_llama

    hub = {"bert-32": make_tiny_bert(home / "hub" / "bert-32", hidden_size=32, seed=1),
           "bert-64": make_tiny_bert(home / "hub" / "bert-64", hidden_size=64, seed=2),
           "llama-32": make_tiny_llama(home / "hub" / "llama-32", hidden_size=32, seed=3)}
    stacks = _make_stack("sqlite", home)
    stack = next(stacks)
    key = stack.create_key("screenshots")
    client = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    for name, path in hub.items():
        client.post("/v1/models", json={"source": "local", "path": str(path), "name": name}).raise_for_status()
    dataset = upload(client, topic_csv(150)).json()
    stack.start_worker()
    tune = {"strategy": "finetune", "top_k": 1, "epochs": 4, "lr": 1e-3, "batch_size": 16, "max_length": 32}
    job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "metrics": ["logme", "ridge_loo"],
                                        "tune": tune}).json()
    done = wait_for(client, job["id"], stack, timeout=600)
    if done["status"] != "succeeded":
        raise SystemExit(f"the job {done['status']}: {done['error']}\n{stack.log_text()}")
    return stacks, stack, job["id"], key


def shoot(url: str, job_id: str, key: str | None, out: Path, chromium: str) -> list[Path]:
    from playwright.sync_api import sync_playwright

    written = []
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        if key:  # as the key dialog stores it: in the tab's session storage, never in the URL
            page.goto(f"{url}/static/app.js")
            page.evaluate("key => sessionStorage.setItem('hubtune.apiKey', key)", key)
        page.goto(f"{url}/jobs/{job_id}")
        page.wait_for_selector("body[data-job-done]", timeout=600_000)
        page.wait_for_timeout(1500)  # the charts' transitions
        for section, name in SHOTS.items():
            node = page.locator(f"#{section}")
            if node.is_visible():
                node.screenshot(path=str(out / name))
                written.append(out / name)
        browser.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url")
    parser.add_argument("--job")
    parser.add_argument("--key")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args(argv)
    if args.url and args.job:
        written = shoot(args.url.rstrip("/"), args.job, args.key, args.out, args.chromium)
    else:
        with tempfile.TemporaryDirectory() as folder:
            stacks, stack, job_id, key = tiny_job(Path(folder))
            try:
                written = shoot(stack.url, job_id, key, args.out, args.chromium)
            finally:
                stacks.close()  # stops the API and the worker
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
