"""A job's tuned checkpoints: GET /v1/jobs/{id}/checkpoints and the download of each recorded file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Header, Response
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy import select
from starlette.concurrency import iterate_in_threadpool

from service.api.deps import OwnerDep, PathText, SessionsDep, SettingsDep, owned_job
from service.api.problems import Problem, problem_responses
from service.artifacts import ArtifactStore, artifact_store, is_remote_location
from service.db import Checkpoint, HubModel
from service.schemas import CheckpointOut

router = APIRouter(prefix="/jobs/{job_id}/checkpoints", tags=["checkpoints"])


@router.get("", responses=problem_responses(401, 404, 422))
def list_checkpoints(job_id: PathText, sessions: SessionsDep, who: OwnerDep) -> list[CheckpointOut]:
    with sessions() as session:
        owned_job(session, job_id, who)
        rows = session.execute(select(Checkpoint, HubModel).join(HubModel, HubModel.id == Checkpoint.model_id)
                               .where(Checkpoint.job_id == job_id).order_by(Checkpoint.id)).all()
        return [CheckpointOut(name=c.name, model=m.name, model_id=m.id, files=c.files) for c, m in rows]


@router.get("/{name}/files/{file_path:path}", response_class=FileResponse, responses={
    200: {"content": {"application/octet-stream": {}}, "description": "The file; X-Checksum-Sha256 is its SHA-256"},
    206: {"content": {"application/octet-stream": {}}, "description": "The byte range asked by Range"},
    **problem_responses(401, 404, 416, 422)})
def download_checkpoint_file(job_id: PathText, name: PathText, file_path: PathText, sessions: SessionsDep,
                             who: OwnerDep, settings: SettingsDep,
                             range_header: Annotated[str | None, Header(alias="Range")] = None) -> Response:
    """One file the checkpoint lists (only those: no path leaves the checkpoint). Range requests are answered
    206 from the local folder and from object storage alike (streamed through the API)."""
    with sessions() as session:
        owned_job(session, job_id, who)
        checkpoint = session.execute(select(Checkpoint).where(Checkpoint.job_id == job_id,
                                                              Checkpoint.name == name)).scalar_one_or_none()
    if checkpoint is None:
        raise Problem(404, "checkpoint not found", f"no checkpoint {name} in job {job_id}")
    listed = {f["path"]: f for f in checkpoint.files}
    if file_path not in listed:  # only files recorded in the checkpoint are served: no path traversal
        raise Problem(404, "file not found", f"{file_path} is not part of checkpoint {name}")
    headers = {"X-Checksum-Sha256": listed[file_path]["sha256"]}
    missing = Problem(404, "file missing", f"{file_path} of checkpoint {name} is recorded but no longer stored",
                      field="file_path")  # deleted, a lost volume or bucket: not found, not a 500
    if is_remote_location(checkpoint.path):
        store = artifact_store(settings)
        key = f"{store.key_of(checkpoint.path)}/{file_path}"
        size = store.size(key)
        if size is None:
            raise missing
        return ranged_stream(store, key, size, range_header, Path(file_path).name, headers)
    stored = Path(checkpoint.path) / file_path
    if not stored.is_file():
        raise missing
    return FileResponse(stored, filename=Path(file_path).name, headers=headers)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range (first, last) a Range header asks for, or None for the whole file (no header, or several
    ranges, or a malformed one, which RFC 9110 lets a server answer whole); a 416 problem when it lies past the end."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_text, dash, last_text = spec.strip().partition("-")
    try:
        if not dash or (not first_text and not last_text):
            raise ValueError(header)
        if not first_text:  # a suffix: the last n bytes
            first, last = max(size - int(last_text), 0), size - 1
        else:
            first, last = int(first_text), int(last_text) if last_text else size - 1
            if last_text and last < first:  # an invalid range-spec (RFC 9110 14.1.1): answered whole
                return None
            last = min(last, size - 1)
    except ValueError:
        return None
    if first < 0 or first >= size:
        raise Problem(416, "range not satisfiable", f"Range {header!r} lies outside the file's {size} bytes",
                      headers={"Content-Range": f"bytes */{size}"})
    return first, last


def ranged_stream(store: ArtifactStore, key: str, size: int, range_header: str | None, filename: str,
                  headers: dict[str, str]) -> StreamingResponse:
    """An object streamed from the store, whole (200) or the asked range (206), as FileResponse answers a file."""
    wanted = parse_range(range_header, size)
    first, last = wanted or (0, size - 1)
    headers = {**headers, "Accept-Ranges": "bytes", "Content-Length": str(last - first + 1),
               "Content-Disposition": f"attachment; filename*=utf-8''{quote(filename)}"}
    if wanted is not None:
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    chunks = store.open_range(key, first, last) if size else iter(())
    return StreamingResponse(iterate_in_threadpool(chunks), status_code=206 if wanted else 200,
                             media_type="application/octet-stream", headers=headers)
