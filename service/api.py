"""The HTTP API (FastAPI). Never imports torch or transformers: it stays small, fast to start and CPU-only."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import shutil
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import datasets as dataset_files
from service import jobs as job_states
from service.db import ApiKey, Checkpoint, Dataset, HubModel, Job, RankingEntry, new_id
from service.contract import (
    ESTIMATORS, IMAGE_PROCESSOR_FILE, TERMINAL, TOKENIZER_ENTRY_FILES, JobPhase, describe_regularizers, estimator_applies,
    resolve_regularizer,
)
from service.schemas import JobCreate, ModelCreate
from service.settings import Settings
from workers.hub import content_revision  # no torch: a hash of the folder's files

log = logging.getLogger("hubtune.api")

LOCAL_OWNER = "local"


class Problem(Exception):
    """An RFC 9457 problem: rendered as application/problem+json with the field or row at fault."""

    def __init__(self, status: int, title: str, detail: str = "", field: str | None = None, row: int | None = None,
                 **extra: Any) -> None:
        super().__init__(detail or title)
        self.status, self.title, self.detail, self.field, self.row, self.extra = status, title, detail, field, row, extra


def problem_response(status: int, title: str, detail: str, instance: str, **members: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, "instance": instance}
    body.update({k: v for k, v in members.items() if v is not None})
    return JSONResponse(body, status_code=status, media_type="application/problem+json")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_model_config(folder: Path) -> dict[str, Any]:
    """What the catalog records about a local HF folder, read from config.json alone (no transformers here)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise Problem(422, "not a model folder", f"{folder} has no config.json", field="path")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Problem(422, "unreadable config.json", str(exc), field="path") from exc
    modality = model_modality(config)
    # the width of the tower that is ranked: a dual encoder's vision tower, a vision-language model's language model
    tower = (config.get("vision_config") if modality == "image" else config.get("text_config")) or {}
    hidden = next((c.get(k) for c in (config, tower) for k in ("hidden_size", "d_model", "n_embd", "dim", "hidden_dim")
                   if isinstance(c.get(k), int)), None)
    if hidden is None and isinstance(config.get("hidden_sizes"), list) and config["hidden_sizes"]:
        hidden = config["hidden_sizes"][-1]  # CNNs (ResNet, ConvNeXt): the last stage's channels
    architectures = config.get("architectures") or []
    has_head = any(a.endswith(SOURCE_HEADS) for a in architectures) and bool(config.get("id2label"))
    if modality == "text" and not any((folder / name).is_file() for name in TOKENIZER_ENTRY_FILES):
        raise Problem(422, "no tokenizer", f"{folder} holds a text model but no tokenizer files (one of "
                      f"{', '.join(TOKENIZER_ENTRY_FILES)}); save it beside the weights: tokenizer.save_pretrained(folder)",
                      field="path")
    if modality == "image" and not (folder / IMAGE_PROCESSOR_FILE).is_file():
        raise Problem(422, "no image processor", f"{folder} holds an image model but no {IMAGE_PROCESSOR_FILE} "
                      "(how images are resized and normalised for it); save it beside the weights: "
                      "image_processor.save_pretrained(folder)", field="path")
    return {"model_type": config.get("model_type"), "architecture": architectures[0] if architectures else None,
            "hidden_size": hidden, "has_source_head": has_head, "modality": modality}


# Classification heads whose softmax LEEP and NCE read (with an id2label in the config).
SOURCE_HEADS = ("ForSequenceClassification", "ForImageClassification")


# Contrastive image-text dual encoders: catalogued as image models, ranked and tuned through their vision tower
# (the common use of CLIP-like checkpoints as image backbones); their text tower is not offered for text datasets.
DUAL_ENCODERS = frozenset({"clip", "siglip", "siglip2", "align", "altclip", "chinese_clip", "metaclip_2"})
# Keys only a model that reads pixels has at the top of its config.
VISION_KEYS = ("image_size", "num_channels", "patch_size")


def model_modality(config: dict[str, Any]) -> str:
    """"text" for a model that reads token ids (a vocabulary), "image" for one that reads pixels. A job's candidates
    are the models of its dataset's modality.

    Vision keys at the top level win over a vocabulary: BEiT and Data2VecVision carry a vocab_size for masked image
    modelling. A vision-language model (text_config and vision_config: LLaVA, Gemma 3, Qwen2-VL) is a text model
    (its language model reads the text); a contrastive dual encoder (DUAL_ENCODERS) is an image model."""
    if config.get("model_type") in DUAL_ENCODERS or any(key in config for key in VISION_KEYS):
        return "image"
    text_config = config.get("text_config") or {}
    if "vocab_size" in config or "vocab_size" in text_config:
        return "text"
    if "vision_config" in config:
        return "image"
    return "text"


def paginate(session: Any, query: Any, limit: int, offset: int, render: Any) -> dict[str, Any]:
    total = session.execute(select(func.count()).select_from(query.subquery())).scalar_one()
    rows = session.execute(query.limit(limit).offset(offset)).scalars().all()
    return {"items": [render(r) for r in rows], "total": total, "limit": limit, "offset": offset,
            "next_offset": offset + limit if offset + limit < total else None}


def dataset_json(d: Dataset) -> dict[str, Any]:
    return {"id": d.id, "filename": d.filename, "format": d.format, "task": d.task, "modality": d.modality,
            "rows": d.rows, "text_column": d.text_column, "text_pair_column": d.text_pair_column,
            "image_column": d.image_column,
            "label_column": d.label_column, "label_names": d.label_names,
            "class_counts": d.class_counts, "sha256": d.sha256, "size_bytes": d.size_bytes,
            "created_at": d.created_at.isoformat()}


def model_json(m: HubModel) -> dict[str, Any]:
    return {"id": m.id, "name": m.name, "source": m.source,
            "repo_id": m.locator if m.source == "hf" else None, "path": m.locator if m.source == "local" else None,
            "revision": m.revision, "modality": m.modality, "model_type": m.model_type,
            "architecture": m.architecture, "hidden_size": m.hidden_size, "has_source_head": m.has_source_head,
            "created_at": m.created_at.isoformat()}


def create_app(settings: Settings, send: job_states.SendTask | None = None, run_reconciler: bool = True) -> FastAPI:
    """The app for these settings. `send` puts a job id on the broker (default: the Celery app's send_task)."""
    from service.db import session_factory
    from service.migrate import upgrade

    settings.ensure_dirs()
    upgrade(settings.sqlalchemy_url)
    sessions: sessionmaker = session_factory(settings.sqlalchemy_url)
    if send is None:
        from workers.celery_app import make_celery

        send = job_states.celery_sender(make_celery(settings))
    keyless = settings.auth == "auto" and is_loopback(settings.bind_host)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # type: ignore[no-untyped-def]
        reconciler = None
        if run_reconciler:
            reconciler = job_states.Reconciler(sessions, send, settings.reconcile_seconds, settings.max_attempts,
                                               settings.requeue_queued_after_seconds)
            reconciler.start()
        if keyless:
            log.warning("HubTune API on %s without required API keys (loopback only); requests without a key "
                        "act as the local user", settings.bind_host)
        yield
        if reconciler:
            reconciler.stop()

    app = FastAPI(title="HubTune", version="0.1.0", lifespan=lifespan,
                  description="Rank hub models for your labelled dataset, then tune the best.")
    app.state.settings, app.state.sessions, app.state.send = settings, sessions, send

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.title, exc.detail, str(request.url.path), field=exc.field,
                                row=exc.row, **exc.extra)

    @app.exception_handler(dataset_files.DatasetProblem)
    async def _dataset_problem(request: Request, exc: dataset_files.DatasetProblem) -> JSONResponse:
        return problem_response(exc.status, exc.title, exc.detail, str(request.url.path), field=exc.field,
                                row=exc.row, path=exc.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": ".".join(str(p) for p in e["loc"] if p not in ("body", "query", "path", "form")),
                   "message": e["msg"]} for e in exc.errors()]
        first = errors[0] if errors else {"field": None, "message": "invalid request"}
        return problem_response(422, "invalid request", f"{first['field']}: {first['message']}",
                                str(request.url.path), field=first["field"], errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem_response(exc.status_code, str(exc.detail), str(exc.detail), str(request.url.path))

    def owner(request: Request) -> str:
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key")
        if not key:
            if keyless:
                return LOCAL_OWNER
            raise Problem(401, "API key required", "send Authorization: Bearer <key> (create one with "
                          "`hubtune keys create`)")
        with sessions() as session:
            found = session.execute(select(ApiKey).where(ApiKey.key_hash == hash_key(key),
                                                         ApiKey.revoked_at.is_(None))).scalar_one_or_none()
        if found is None:
            raise Problem(401, "invalid API key", "this key is unknown or revoked")
        return found.id

    def owned_dataset(session: Any, dataset_id: str, who: str) -> Dataset:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None or dataset.owner != who:
            raise Problem(404, "dataset not found", f"no dataset {dataset_id}")
        return dataset

    def owned_job(session: Any, job_id: str, who: str) -> Job:
        job = session.get(Job, job_id)
        if job is None or job.owner != who:
            raise Problem(404, "job not found", f"no job {job_id}")
        return job

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        with sessions() as session:
            session.execute(select(1))
        return {"status": "ok"}

    # ---- datasets -------------------------------------------------------------------------------------------
    @app.post("/v1/datasets", status_code=201)
    async def upload_dataset(request: Request, file: UploadFile = File(...), task: str = Form(...),
                             text_column: str = Form("text"), label_column: str = Form("label"),
                             image_column: str | None = Form(None), text_pair_column: str | None = Form(None),
                             who: str = Depends(owner)) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_upload_bytes + 1024 * 1024:
            raise Problem(413, "file too large", f"the upload is {declared} bytes; the limit is "
                          f"{settings.max_upload_bytes} (HUBTUNE_MAX_UPLOAD_BYTES)", field="file")
        dataset_id = new_id()
        scratch = settings.datasets_dir / f".upload-{uuid.uuid4().hex}"
        final_dir = settings.datasets_dir / dataset_id
        committed = False
        try:
            size, sha256 = await dataset_files.stream_upload_to_disk(file, scratch, settings.max_upload_bytes)
            with scratch.open("rb") as fh:
                head = fh.read(8)
            fmt = dataset_files.detect_format(file.filename or "", file.content_type, head)
            parsed = await run_in_threadpool(dataset_files.parse_dataset, scratch, fmt, task, text_column,
                                             label_column, image_column=image_column,
                                             max_image_bytes=settings.max_upload_bytes,
                                             text_pair_column=text_pair_column or None)
            final_dir.mkdir(parents=True)
            data_path = final_dir / "data.parquet"
            await run_in_threadpool(dataset_files.write_normalized, parsed, task, data_path)
            with sessions.begin() as session:
                images = parsed.modality == "image"
                dataset = Dataset(id=dataset_id, owner=who, filename=file.filename or "upload", format=fmt,
                                  task=task, modality=parsed.modality, text_column=None if images else text_column,
                                  text_pair_column=text_pair_column or None,
                                  image_column=parsed.image_column,
                                  label_column=None if parsed.labels_from_folders else label_column, rows=parsed.rows,
                                  label_names=parsed.label_names, class_counts=parsed.class_counts, sha256=sha256,
                                  size_bytes=size, storage_path=str(data_path))
                session.add(dataset)
            committed = True
            return dataset_json(dataset)
        finally:
            scratch.unlink(missing_ok=True)
            if not committed:
                shutil.rmtree(final_dir, ignore_errors=True)

    @app.get("/v1/datasets")
    def list_datasets(limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0),
                      who: str = Depends(owner)) -> dict[str, Any]:
        with sessions() as session:
            query = select(Dataset).where(Dataset.owner == who).order_by(Dataset.created_at.desc(), Dataset.id)
            return paginate(session, query, limit, offset, dataset_json)

    @app.get("/v1/datasets/{dataset_id}")
    def get_dataset(dataset_id: str, who: str = Depends(owner)) -> dict[str, Any]:
        with sessions() as session:
            return dataset_json(owned_dataset(session, dataset_id, who))

    # ---- models ---------------------------------------------------------------------------------------------
    @app.get("/v1/models")
    def list_models(limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0),
                    _who: str = Depends(owner)) -> dict[str, Any]:
        with sessions() as session:
            return paginate(session, select(HubModel).order_by(HubModel.created_at, HubModel.id), limit, offset,
                            model_json)

    @app.post("/v1/models", status_code=201)
    def register_model(body: ModelCreate, _who: str = Depends(owner)) -> JSONResponse:
        missing = body.missing_locator()
        if missing:
            raise Problem(422, f"{missing} is required", f"source {body.source!r} needs {missing}", field=missing)
        if body.source == "local":
            folder = Path(body.path or "").expanduser()
            if not folder.is_absolute() or not folder.is_dir():
                raise Problem(422, "model folder not found", f"{body.path} is not an absolute path to a folder "
                              "the server can read", field="path")
            folder = folder.resolve()
            described = read_model_config(folder)
            locator, revision, name = str(folder), content_revision(folder), body.name or folder.name
        else:
            described = {}
            locator, revision, name = body.repo_id or "", body.revision or "main", body.name or body.repo_id or ""
        with sessions.begin() as session:
            existing = session.execute(select(HubModel).where(
                HubModel.source == body.source, HubModel.locator == locator, HubModel.revision == revision,
            )).scalar_one_or_none()
            if existing is not None:
                return JSONResponse(model_json(existing), status_code=200)
            model = HubModel(name=name, source=body.source, locator=locator, revision=revision, **described)
            session.add(model)
        return JSONResponse(model_json(model), status_code=201)

    # ---- jobs -----------------------------------------------------------------------------------------------
    def job_json(session: Any, job: Job) -> dict[str, Any]:
        entries = session.execute(select(RankingEntry, HubModel).join(HubModel, HubModel.id == RankingEntry.model_id)
                                  .where(RankingEntry.job_id == job.id).order_by(RankingEntry.rank)).all()
        ranking = [{"model": model.name, "model_id": model.id, "rank": entry.rank, "scores": entry.scores,
                    "feature_seconds": entry.feature_seconds, **entry.details} for entry, model in entries]
        return {"id": job.id, "status": job.status, "stage": job.stage, "progress": job.progress,
                "dataset_id": job.dataset_id, "candidates": job.candidates, "metrics": job.metrics,
                "options": job.options, "tune": job.tune, "ranking": ranking,
                "ranking_summary": job.ranking_summary, "tuning": job.tuning,
                "error": job.error, "attempts": job.attempts, "created_at": job.created_at.isoformat(),
                "started_at": job.started_at.isoformat() if job.started_at else None,
                "finished_at": job.finished_at.isoformat() if job.finished_at else None}

    @app.post("/v1/jobs", status_code=202)
    def create_job(body: JobCreate, who: str = Depends(owner)) -> JSONResponse:
        with sessions() as session:
            dataset = owned_dataset(session, body.dataset_id, who)
            for i, metric in enumerate(body.metrics):
                if metric not in ESTIMATORS:
                    raise Problem(422, "unknown metric", f"{metric!r}; known: {', '.join(ESTIMATORS)}",
                                  field=f"metrics[{i}]")
                if not estimator_applies(metric, dataset.task):
                    raise Problem(422, "metric not defined for this task",
                                  f"{metric} is defined for classification only; this dataset is {dataset.task}",
                                  field=f"metrics[{i}]")
            if body.candidates is None:
                candidates = list(session.execute(select(HubModel.id).where(HubModel.modality == dataset.modality)
                                                  .order_by(HubModel.created_at)).scalars())
                if not candidates:
                    raise Problem(422, "no candidate models", f"no {dataset.modality} model is registered; register "
                                  "models with POST /v1/models first", field="candidates")
            else:
                if not body.candidates:
                    raise Problem(422, "no candidate models", "candidates is empty", field="candidates")
                for i, model_id in enumerate(body.candidates):
                    candidate = session.get(HubModel, model_id)
                    if candidate is None:
                        raise Problem(422, "unknown model", f"no model {model_id}", field=f"candidates[{i}]")
                    if candidate.modality != dataset.modality:
                        raise Problem(422, f"not an {dataset.modality} model" if dataset.modality == "image"
                                      else f"not a {dataset.modality} model",
                                      f"{candidate.name} reads {candidate.modality}s; this dataset holds "
                                      f"{dataset.modality}s", field=f"candidates[{i}]")
                candidates = list(dict.fromkeys(body.candidates))
            if body.successive_halving is not None:
                if len(body.metrics) != 1:
                    raise Problem(422, "successive halving ranks by one metric", "give exactly one metric",
                                  field="metrics")
                if body.sample_size is not None:
                    raise Problem(422, "sample_size cannot be combined with successive_halving",
                                  "successive halving chooses its own samples", field="sample_size")
            if body.tune is not None:
                try:
                    resolve_regularizer(body.tune.regularizer.name, body.tune.regularizer.params,
                                        where="tune.regularizer")
                except ValueError as exc:
                    field_name, _, message = str(exc).partition(": ")
                    raise Problem(422, "invalid regularizer setting", message, field=field_name) from exc
                if body.tune.target is not None and body.tune.target not in candidates:
                    raise Problem(422, "tune target is not a candidate", body.tune.target, field="tune.target")
                if body.tune.strategy == "btuning" and "logme" not in body.metrics:
                    raise Problem(422, "btuning needs LogME", "add 'logme' to metrics", field="tune.strategy")
                if body.sample_size is not None:
                    raise Problem(422, "sample_size cannot be combined with tune",
                                  "tuning uses the whole dataset; rank on a sample in a separate job",
                                  field="sample_size")
        job = Job(owner=who, dataset_id=dataset.id, candidates=candidates, metrics=list(dict.fromkeys(body.metrics)),
                  options={"sample_size": body.sample_size, "seed": body.seed, "pooling": body.pooling,
                           "successive_halving": body.successive_halving.model_dump()
                           if body.successive_halving else None},
                  tune=body.tune.model_dump() if body.tune else None)
        with sessions.begin() as session:
            session.add(job)
        # Enqueued only after the row is committed; if this send fails the reconciler re-sends it.
        try:
            job_states.enqueue(sessions, send, job.id, JobPhase.RANK)
        except Exception:
            log.exception("could not enqueue job %s now; the reconciler will", job.id)
        with sessions() as session:
            body_json = job_json(session, session.get(Job, job.id))
        return JSONResponse(body_json, status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})

    @app.get("/v1/jobs")
    def list_jobs(limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0),
                  who: str = Depends(owner)) -> dict[str, Any]:
        with sessions() as session:
            query = select(Job).where(Job.owner == who).order_by(Job.created_at.desc(), Job.id)
            return paginate(session, query, limit, offset, lambda j: job_json(session, j))

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str, who: str = Depends(owner)) -> dict[str, Any]:
        with sessions() as session:
            return job_json(session, owned_job(session, job_id, who))

    @app.post("/v1/jobs/{job_id}/cancel", status_code=202)
    def cancel_job(job_id: str, who: str = Depends(owner)) -> dict[str, Any]:
        with sessions() as session:
            job = owned_job(session, job_id, who)
            if job.status in TERMINAL:
                raise Problem(409, "job already finished", f"job {job_id} is {job.status}")
        job_states.request_cancel(sessions, job_id)
        with sessions() as session:
            return job_json(session, session.get(Job, job_id))

    @app.get("/v1/regularizers")
    def list_regularizers(_who: str = Depends(owner)) -> dict[str, Any]:
        """Every regularizer's parameters with defaults and meaning (tune.regularizer.params)."""
        return describe_regularizers()

    # ---- checkpoints ----------------------------------------------------------------------------------------
    @app.get("/v1/jobs/{job_id}/checkpoints")
    def list_checkpoints(job_id: str, who: str = Depends(owner)) -> list[dict[str, Any]]:
        with sessions() as session:
            owned_job(session, job_id, who)
            rows = session.execute(select(Checkpoint, HubModel).join(HubModel, HubModel.id == Checkpoint.model_id)
                                   .where(Checkpoint.job_id == job_id).order_by(Checkpoint.id)).all()
            return [{"name": c.name, "model": m.name, "model_id": m.id, "files": c.files} for c, m in rows]

    @app.get("/v1/jobs/{job_id}/checkpoints/{name}/files/{file_path:path}")
    def download_checkpoint_file(job_id: str, name: str, file_path: str, who: str = Depends(owner)) -> FileResponse:
        with sessions() as session:
            owned_job(session, job_id, who)
            checkpoint = session.execute(select(Checkpoint).where(Checkpoint.job_id == job_id,
                                                                  Checkpoint.name == name)).scalar_one_or_none()
        if checkpoint is None:
            raise Problem(404, "checkpoint not found", f"no checkpoint {name} in job {job_id}")
        listed = {f["path"]: f for f in checkpoint.files}
        if file_path not in listed:  # only files recorded in the checkpoint are served: no path traversal
            raise Problem(404, "file not found", f"{file_path} is not part of checkpoint {name}")
        return FileResponse(Path(checkpoint.path) / file_path, filename=Path(file_path).name,
                            headers={"X-Checksum-Sha256": listed[file_path]["sha256"]})

    return app
