"""HTTP client behind the `hubtune` CLI's user commands: upload, submit, watch with a progress bar, show tables."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from service.contract import TERMINAL


class ApiError(Exception):
    def __init__(self, response: httpx.Response) -> None:
        try:
            body = response.json()
        except ValueError:
            body = {"title": response.text}
        where = " ".join(f"{k}={body[k]}" for k in ("field", "row") if body.get(k) is not None)
        super().__init__(f"HTTP {response.status_code}: {body.get('title')}: {body.get('detail', '')}"
                         + (f" ({where})" if where else ""))
        self.status, self.body = response.status_code, body


class Client:
    def __init__(self, url: str, key: str | None = None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def _check(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise ApiError(response)
        return response.json()

    def get(self, path: str, **params: Any) -> Any:
        return self._check(self.http.get(path, params=params))

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._check(self.http.post(path, json=body or {}))

    def delete(self, path: str) -> None:
        response = self.http.delete(path)
        if response.status_code >= 400:
            raise ApiError(response)

    def upload(self, file: Path, task: str, text_column: str | None, label_column: str,
               image_column: str | None = None, text_pair_column: str | None = None,
               feature_columns: list[str] | str | None = None) -> dict[str, Any]:
        """POST the file as a dataset; text_column None: the server's default ("text"), or a table's
        feature_columns (LIFT: each row written as one sentence, docs/datasets.md#tables): a list, or the form's
        text (comma-separated names, or a JSON array)."""
        form = {"task": task, "label_column": label_column}
        if text_column is not None:
            form["text_column"] = text_column
        if feature_columns is not None:  # a list goes as a JSON array: names may hold commas
            form["feature_columns"] = (feature_columns if isinstance(feature_columns, str)
                                       else json.dumps(feature_columns))
        if image_column is not None:
            form["image_column"] = image_column
        if text_pair_column is not None:
            form["text_pair_column"] = text_pair_column
        with file.open("rb") as fh:
            response = self.http.post("/v1/datasets", files={"file": (file.name, fh)}, data=form, timeout=None)
        return self._check(response)

    def add_model(self, path: str | None = None, repo_id: str | None = None, revision: str | None = None,
                  name: str | None = None) -> dict[str, Any]:
        if path:
            body = {"source": "local", "path": str(Path(path).expanduser().resolve()), "name": name}
        else:
            body = {"source": "hf", "repo_id": repo_id, "revision": revision, "name": name}
        return self.post("/v1/models", {k: v for k, v in body.items() if v is not None})

    def watch(self, job_id: str, interval: float = 1.0, out: Any = sys.stderr) -> dict[str, Any]:
        """Poll until the job finishes: a progress bar on a terminal, one line per stage change otherwise."""
        from tqdm import tqdm

        interactive = hasattr(out, "isatty") and out.isatty()
        bar = tqdm(total=100, file=out, bar_format="{bar}| {n:.0f}% [{elapsed}] {desc}") if interactive else None
        last = None
        try:
            while True:
                job = self.get(f"/v1/jobs/{job_id}")
                if bar is not None:
                    bar.n = round(100 * job["progress"], 1)
                    bar.set_description_str(f"{job['status']}: {job['stage']}"[:70])
                    bar.refresh()
                elif (job["status"], job["stage"]) != last:
                    print(f"{job['status']}: {job['stage']} ({job['progress']:.0%})", file=out, flush=True)
                    last = (job["status"], job["stage"])
                if job["status"] in TERMINAL:
                    return job
                time.sleep(interval)
        finally:
            if bar is not None:
                bar.close()

    def download_checkpoints(self, job_id: str, out_dir: Path) -> list[Path]:
        """Fetch every checkpoint file and verify its size and sha256 against the listing."""
        written: list[Path] = []
        for checkpoint in self.get(f"/v1/jobs/{job_id}/checkpoints"):
            for entry in checkpoint["files"]:
                target = out_dir / checkpoint["name"] / entry["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                partial = target.with_name(target.name + ".part")
                url = f"/v1/jobs/{job_id}/checkpoints/{checkpoint['name']}/files/{entry['path']}"
                with self.http.stream("GET", url, timeout=None) as response, partial.open("wb") as fh:
                    if response.status_code >= 400:
                        response.read()
                        raise ApiError(response)
                    for chunk in response.iter_bytes(1 << 20):
                        digest.update(chunk)
                        fh.write(chunk)
                if digest.hexdigest() != entry["sha256"] or partial.stat().st_size != entry["size"]:
                    partial.unlink()
                    raise RuntimeError(f"{entry['path']}: checksum mismatch; download again")
                partial.replace(target)
                written.append(target)
        return written


def format_table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ranking_table(job: dict[str, Any]) -> str:
    metrics = job["metrics"]
    rows = []
    for entry in job["ranking"]:
        row: list[Any] = [entry["rank"], entry["model"]]
        for metric in metrics:
            value = entry["scores"].get(metric)
            interval = (entry.get("intervals") or {}).get(metric)
            text = "n/a" if value is None else f"{value:.4f}"
            if interval:
                text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
            row.append(text)
        p_next = (entry.get("p_better_than_next") or {}).get(metrics[0])
        row.append("" if p_next is None else f"{p_next:.2f}")
        if "logme_prior_only" in entry:
            row.append("yes" if entry.get("beats_prior") else "NO")
        row.append(f"{entry['feature_seconds']:.1f}")
        rows.append(row)
    header = ["rank", "model", *[f"{m} [95% CI]" for m in metrics], "P(>next)"]
    if job["ranking"] and "logme_prior_only" in job["ranking"][0]:
        header.append("beats prior")
    header.append("features s")
    table = format_table(rows, header)
    if job["ranking"] and "logme_prior_only" in job["ranking"][0]:
        table += f"\nLogME of the label-prior-only baseline: {job['ranking'][0]['logme_prior_only']:.4f}"
        scored = [e for e in job["ranking"] if (e.get("scores") or {}).get("logme") is not None]
        behind = [e for e in scored if not e.get("beats_prior")]
        if behind:
            # the Occam failure (docs/findings.md): LogME's order among these is not the order fine-tuning gives
            table += (f"\n{len(behind)} of {len(scored)} models do not beat it: with this few rows LogME cannot tell "
                      "their features from none, and may rank a random model first.")
            if metrics[0] == "logme":
                table += " Rank by a held-out estimator instead: --metric ridge_loo --metric logme_projected."
    for entry in job["ranking"]:
        if entry.get("error"):
            table += f"\n{entry['model']} could not be scored: {entry['error']}"
    transform = ((job.get("ranked_by") or {}).get("features") or {}).get("transform")
    if isinstance(transform, dict):  # the estimators read transformed features: say so beside their scores
        table += f"\nFeatures transformed: {transform['name']} (alpha {transform['alpha']})"
    verdict = job.get("verdict") or {}
    if verdict.get("summary"):
        table += f"\nVerdict: {verdict['summary']}"
    return table


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))
