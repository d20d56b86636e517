"""A job's tuned checkpoints: GET /v1/jobs/{id}/checkpoints and the download of each recorded file."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from sqlalchemy import select

from service.api.deps import OwnerDep, PathText, SessionsDep, owned_job
from service.api.problems import Problem, problem_responses
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
    **problem_responses(401, 404, 422)})
def download_checkpoint_file(job_id: PathText, name: PathText, file_path: PathText, sessions: SessionsDep,
                             who: OwnerDep) -> FileResponse:
    """One file the checkpoint lists (only those: no path leaves the checkpoint)."""
    with sessions() as session:
        owned_job(session, job_id, who)
        checkpoint = session.execute(select(Checkpoint).where(Checkpoint.job_id == job_id,
                                                              Checkpoint.name == name)).scalar_one_or_none()
    if checkpoint is None:
        raise Problem(404, "checkpoint not found", f"no checkpoint {name} in job {job_id}")
    listed = {f["path"]: f for f in checkpoint.files}
    if file_path not in listed:  # only files recorded in the checkpoint are served: no path traversal
        raise Problem(404, "file not found", f"{file_path} is not part of checkpoint {name}")
    stored = Path(checkpoint.path) / file_path
    if not stored.is_file():  # recorded, but gone from disk (deleted or a lost volume): not found, not a 500
        raise Problem(404, "file missing", f"{file_path} of checkpoint {name} is recorded but no longer stored",
                      field="file_path")
    return FileResponse(stored, filename=Path(file_path).name,
                        headers={"X-Checksum-Sha256": listed[file_path]["sha256"]})
