"""The `hubtune` command: server side (serve, worker, migrate, keys) and client side (datasets, models, rank, tune,
jobs)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from service.contract import JobStatus
from service.settings import Settings, get_settings


def worker_command(queues: str = "rank,tune", concurrency: int = 1, loglevel: str = "info",
                   heartbeat: bool = False, name: str | None = None) -> list[str]:
    """One prefork child per worker (-c 1): one process per GPU; the hard time limits need prefork. `heartbeat`:
    the worker's event heartbeats, by which Flower tells it is online (only a broker with a fanout exchange)."""
    return [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", queues, "-c", str(concurrency),
            "--prefetch-multiplier", "1", "--without-mingle", "--without-gossip",
            *([] if heartbeat else ["--without-heartbeat"]), "-l", loglevel,
            "-n", f"{name or f'hubtune-{os.getpid()}'}@%h"]


def cmd_migrate(_args: argparse.Namespace, settings: Settings) -> int:
    from service.artifacts import ensure_artifact_store
    from service.migrate import upgrade

    settings.ensure_dirs()
    upgrade(settings.sqlalchemy_url)
    ensure_artifact_store(settings)  # the bucket, on a fresh object store
    print(f"database at head: {settings.sqlalchemy_url.split('@')[-1]}")
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from service.artifacts import ensure_artifact_store

    settings.ensure_dirs()
    ensure_artifact_store(settings)  # fails fast on a wrong HUBTUNE_ARTIFACTS_URL or credentials
    heartbeat = not settings.celery_broker_url.startswith("filesystem")
    if args.gpus is None:
        os.execv(sys.executable, worker_command(args.queues, args.concurrency, args.loglevel, heartbeat=heartbeat))
    from service.gpus import GpuSpecError, choose_gpus, list_gpus, run_per_gpu
    from service.lifeline import parent_death_signal

    try:
        gpus = choose_gpus(args.gpus, list_gpus())
    except GpuSpecError as exc:
        print(f"hubtune worker: {exc}", file=sys.stderr)
        return 2
    print(f"hubtune worker: one worker process per GPU: {', '.join(gpus)}", file=sys.stderr)
    return run_per_gpu(gpus, lambda gpu: worker_command(args.queues, args.concurrency, args.loglevel,
                                                        heartbeat=heartbeat, name=f"hubtune-gpu{gpu}-{os.getpid()}"),
                       preexec_fn=parent_death_signal(signal.SIGKILL))


class WorkerChild:
    """The worker process `hubtune serve` starts beside the API, and its stop within a deadline."""

    def __init__(self, stop_seconds: float) -> None:
        from service.lifeline import PARENT_PID_ENV, parent_death_signal

        # Its own session (a terminal's Ctrl-C reaches serve only, which stops it in order), and the kernel's
        # SIGKILL when serve dies, even by SIGKILL itself: a worker never outlives the serve that started it.
        self.process = subprocess.Popen(worker_command(), env=dict(os.environ, **{PARENT_PID_ENV: str(os.getpid())}),
                                        start_new_session=True, preexec_fn=parent_death_signal(signal.SIGKILL))
        self.stop_seconds = stop_seconds
        self.stop_by: float | None = None  # when it must be gone: set at the first stop request

    def ask_to_stop(self) -> None:
        if self.stop_by is not None:
            return
        self.stop_by = time.monotonic() + self.stop_seconds
        if self.process.poll() is None:
            # SIGTERM to Celery's main process only: its warm shutdown stops the pool children itself (signalling
            # the whole group made Celery log the pool child's SIGTERM as an ERROR at every clean stop).
            self.process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """Warm shutdown until the deadline, then SIGKILL to whatever is left of its process group (a task still
        running: its job's lease expires and the reconciler re-queues it)."""
        self.ask_to_stop()
        try:
            self.process.wait(timeout=max(0.0, (self.stop_by or 0.0) - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.process.wait(timeout=5)  # reaped, not left a zombie
        except subprocess.TimeoutExpired:
            pass


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from service.app import create_app
    from service.security import is_loopback

    os.environ["HUBTUNE_BIND_HOST"] = args.host
    settings = Settings()  # re-read with the bind host
    if settings.log_format == "json":
        from service.logs import use_json_logs

        use_json_logs(logging.WARNING)  # as in text mode, where uvicorn logs warnings: no migration chatter
    if settings.auth == "auto" and is_loopback(args.host):
        print(f"HubTune: keyless mode on {args.host} (loopback only): requests without an API key act as the local "
              "user. Bind another host, or set HUBTUNE_AUTH=required, to require keys.", file=sys.stderr)
    app = create_app(settings)  # migrates first, so the worker starts on a current schema
    # Twice the requests' grace for the worker: an idle Celery worker's warm shutdown alone takes about 7 s.
    worker = None if args.no_worker else WorkerChild(2 * settings.shutdown_grace_seconds)
    if worker is not None:
        print(f"HubTune: worker child process pid {worker.process.pid}", file=sys.stderr)

    def exit_now(code: int) -> None:
        """Stop the worker, then leave without waiting for request threads still busy (a long parse): the
        interpreter would otherwise join them at exit, for as long as they run."""
        if worker is not None:
            worker.stop()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if worker is not None:
                worker.ask_to_stop()  # the worker's warm shutdown runs alongside the API's graceful one
            super().handle_exit(sig, frame)

    # uvicorn restores these handlers after its graceful shutdown and re-raises the signal it caught.
    signal.signal(signal.SIGTERM, lambda signum, _frame: exit_now(128 + signum))
    signal.signal(signal.SIGINT, lambda signum, _frame: exit_now(128 + signum))
    print(f"HubTune: home {settings.home_dir}; database {settings.sqlalchemy_url.split('@')[-1]}; "
          f"broker {settings.celery_broker_url.split('@')[-1]}; http://{args.host}:{args.port}", file=sys.stderr)
    # Requests still running shutdown_grace_seconds after a stop signal are cancelled.
    # JSON logs: uvicorn's loggers write through the root logger's JSON handler instead of their own
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=max(1, math.ceil(settings.shutdown_grace_seconds)),
                            **({"log_config": None} if settings.log_format == "json" else {}))
    code = 0
    try:
        Server(config).run()
    except SystemExit as exc:  # uvicorn could not start (the port is taken): it logged why
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    exit_now(code)
    return code  # not reached


def _key_sessions(settings: Settings) -> Any:
    from service.db import session_factory
    from service.migrate import upgrade

    settings.ensure_dirs()
    upgrade(settings.sqlalchemy_url)
    return session_factory(settings.sqlalchemy_url)


def _one_key(sessions: Any, ref: str) -> Any:
    from service.security import find_keys

    found = find_keys(sessions, ref)
    if len(found) != 1:
        raise SystemExit(f"{ref!r} names {len(found)} keys; give a key's id or prefix from `hubtune keys list`")
    return found[0]


def cmd_keys_create(args: argparse.Namespace, settings: Settings) -> int:
    from service.security import ADMIN, USER, create_key, parse_duration

    try:
        expires_in = parse_duration(args.expires_in) if args.expires_in else None
    except ValueError as exc:
        raise SystemExit(f"--expires-in: {exc}") from exc
    key, row = create_key(_key_sessions(settings), args.name, ADMIN if args.admin else USER, expires_in)
    print(key)
    until = f", expires {row.expires_at.isoformat(timespec='seconds')}" if row.expires_at else ""
    print(f"{row.role} key {row.id} ({row.prefix}){until}. Store it now: only its hash is kept.", file=sys.stderr)
    return 0


def cmd_keys_list(_args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy import select

    from service.client import format_table
    from service.db import ApiKey
    from service.security import key_status

    with _key_sessions(settings)() as session:
        keys = session.execute(select(ApiKey).order_by(ApiKey.created_at)).scalars().all()
    print(format_table([[k.id, k.prefix, k.name, k.role, key_status(k), k.created_at.isoformat(timespec="seconds"),
                         k.expires_at.isoformat(timespec="seconds") if k.expires_at else ""] for k in keys],
                       ["id", "prefix", "name", "role", "status", "created", "expires"]))
    return 0


def cmd_keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from service.db import ApiKey, utcnow

    sessions = _key_sessions(settings)
    key = _one_key(sessions, args.key)
    with sessions.begin() as session:
        row = session.get(ApiKey, key.id)
        row.revoked_at = row.revoked_at or utcnow()
    print(f"revoked key {key.id} ({key.prefix}); requests with it get 401 from now on", file=sys.stderr)
    return 0


def cmd_keys_set_role(args: argparse.Namespace, settings: Settings) -> int:
    from service.db import ApiKey

    sessions = _key_sessions(settings)
    key = _one_key(sessions, args.key)
    with sessions.begin() as session:
        session.get(ApiKey, key.id).role = args.role
    print(f"key {key.id} ({key.prefix}) is now a {args.role} key", file=sys.stderr)
    return 0


def _client(args: argparse.Namespace) -> Any:
    from service.client import Client

    return Client(args.url, args.key)


def cmd_datasets(args: argparse.Namespace, _settings: Settings) -> int:
    from service.client import format_table, print_json

    client = _client(args)
    if args.action == "upload":
        print_json(client.upload(Path(args.file), args.task, args.text_column, args.label_column,
                                 args.image_column, args.text_pair_column, args.feature_columns))
    elif args.action == "list":
        items = client.get("/v1/datasets", limit=args.limit)["items"]
        print(format_table([[d["id"], d["filename"], d["task"], d["rows"], ",".join(d["label_names"] or [])]
                            for d in items], ["id", "file", "task", "rows", "labels"]))
    else:
        print_json(client.get(f"/v1/datasets/{args.id}"))
    return 0


def cmd_models(args: argparse.Namespace, _settings: Settings) -> int:
    from service.client import format_table, print_json

    client = _client(args)
    if args.action == "add" and args.checkpoint:
        job_id, _, name = args.checkpoint.partition("/")
        print_json(client.post("/v1/models", {"source": "checkpoint", "job_id": job_id, "name": name}))
    elif args.action == "add":
        if not args.path and not args.repo_id:
            raise SystemExit("give --path FOLDER, --repo-id ORG/NAME [--revision REV] or --checkpoint JOB_ID/NAME")
        print_json(client.add_model(args.path, args.repo_id, args.revision, args.name))
    elif args.action == "remove":
        client.delete(f"/v1/models/{args.id}")
        print(f"removed model {args.id}", file=sys.stderr)
    else:
        items = client.get("/v1/models", limit=1000)["items"]
        print(format_table([[m["id"], m["name"], m["source"], m["revision"][:16], m["model_type"], m["hidden_size"],
                             "catalog" if m["shared"] else "own"] for m in items],
                           ["id", "name", "source", "revision", "type", "dim", "scope"]))
    return 0


def _job_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"dataset_id": args.dataset_id}
    if args.metric:  # else the server's default (service.contract.DEFAULT_METRICS)
        body["metrics"] = args.metric
    if args.model:
        body["candidates"] = args.model
    if args.sample_size:
        body["sample_size"] = args.sample_size
    if args.pooling != "mean":
        body["pooling"] = args.pooling
    if args.softdecay is not None:  # the server's default alpha when the flag is given bare
        body["feature_transform"] = "softdecay"
        if args.softdecay != "default":
            body["softdecay_alpha"] = float(args.softdecay)
    if getattr(args, "tune", None):
        body["tune"] = __import__("json").loads(args.tune)
        # the flags win over the same keys in --tune's JSON
        if getattr(args, "head", None):
            body["tune"]["head"] = args.head
        if getattr(args, "ood_dataset", None):
            body["tune"]["ood_dataset_id"] = args.ood_dataset
        if getattr(args, "tune_softdecay", None) is not None:
            body["tune"]["softdecay"] = {} if args.tune_softdecay == "default" else {
                "alpha": float(args.tune_softdecay)}
    return body


def _show_job(job: dict[str, Any]) -> None:
    from service.client import ranking_table

    print(f"job {job['id']}: {job['status']} ({job['stage']})")
    if job.get("error"):
        print(f"error: {job['error']}")
    if job["ranking"]:
        print(ranking_table(job))
    if job.get("tuning"):
        from service.client import print_json

        print_json(job["tuning"])


def cmd_rank(args: argparse.Namespace, _settings: Settings) -> int:
    client = _client(args)
    job = client.post("/v1/jobs", _job_body(args))
    print(f"submitted job {job['id']}", file=sys.stderr)
    if args.no_watch:
        print(job["id"])
        return 0
    job = client.watch(job["id"])
    _show_job(job)
    return 0 if job["status"] == JobStatus.SUCCEEDED else 1


def cmd_jobs(args: argparse.Namespace, _settings: Settings) -> int:
    from service.client import format_table, print_json

    client = _client(args)
    if args.action == "list":
        items = client.get("/v1/jobs", limit=args.limit)["items"]
        print(format_table([[j["id"], j["status"], j["stage"], f"{j['progress']:.0%}", j["created_at"][:19]]
                            for j in items], ["id", "status", "stage", "progress", "created"]))
    elif args.action == "show":
        job = client.get(f"/v1/jobs/{args.id}")
        print_json(job) if args.json else _show_job(job)
    elif args.action == "watch":
        _show_job(client.watch(args.id))
    elif args.action == "cancel":
        print_json(client.post(f"/v1/jobs/{args.id}/cancel"))
    elif args.action == "download":
        for path in client.download_checkpoints(args.id, Path(args.out)):
            print(path)
    return 0


def _add_keys_commands(sub: Any) -> None:
    """`hubtune keys create | list | revoke | set-role`."""
    keys = sub.add_parser("keys", help="API keys (on the server: they write its database)").add_subparsers(
        dest="action", required=True)
    create = keys.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", default="")
    create.add_argument("--admin", action="store_true",
                        help="an admin key: manages the shared catalog, registers local folders, sees server paths")
    create.add_argument("--expires-in", help="the key stops working after this long: 90m, 12h, 30d, 2w")
    create.set_defaults(func=cmd_keys_create)
    keys.add_parser("list", help="every key: id, prefix, role, status").set_defaults(func=cmd_keys_list)
    revoke = keys.add_parser("revoke", help="stop a key (its datasets and jobs stay)")
    revoke.add_argument("key", help="the key's id or prefix")
    revoke.set_defaults(func=cmd_keys_revoke)
    set_role = keys.add_parser("set-role", help="make a key an admin or a user key")
    set_role.add_argument("key", help="the key's id or prefix")
    set_role.add_argument("role", choices=["admin", "user"])
    set_role.set_defaults(func=cmd_keys_set_role)


def with_client(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A client command's --url and --key (default: HUBTUNE_URL, HUBTUNE_API_KEY)."""
    p.add_argument("--url", default=os.environ.get("HUBTUNE_URL", "http://127.0.0.1:8000"))
    p.add_argument("--key", default=os.environ.get("HUBTUNE_API_KEY"))
    return p


def _add_job_commands(sub: Any) -> None:
    """`hubtune rank` and `hubtune tune`: submit a job and watch it."""
    def job_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("dataset_id")
        p.add_argument("--model", action="append", help="candidate model id (repeat); default all")
        p.add_argument("--metric", action="append", help="metric name (repeat); default ridge_loo, logme")
        p.add_argument("--sample-size", type=int)
        p.add_argument("--pooling", choices=["mean", "head"], default="mean",
                       help="features to rank: mean over tokens (default) or the token a classification head reads")
        p.add_argument("--softdecay", nargs="?", const="default", metavar="ALPHA",
                       help="feature_transform softdecay: flatten the ranked rows' feature spectrum first (alpha in "
                       "(-1, 0]; bare: the server's default, -0.6)")
        p.add_argument("--no-watch", action="store_true")

    rank = with_client(sub.add_parser("rank", help="submit a rank job and watch it"))
    job_args(rank)
    rank.set_defaults(func=cmd_rank)
    tune = with_client(sub.add_parser("tune", help="submit a rank+tune job and watch it"))
    job_args(tune)
    tune.add_argument("--tune", default='{"strategy": "finetune"}', help="the tune object as JSON")
    tune.add_argument("--head", choices=["linear", "sngp"], help="tune.head: the output layer (sngp: calibrated "
                      "Gaussian-process head, classification only)")
    tune.add_argument("--tune-softdecay", nargs="?", const="default", metavar="ALPHA",
                      help="tune.softdecay: SoftDecay of the last layer's token states while tuning and in the "
                      "checkpoint (alpha in (-1, 0]; bare: -0.2)")
    tune.add_argument("--ood-dataset", metavar="DATASET_ID", help="tune.ood_dataset_id: rows out of "
                      "distribution; each tuned model reports ood_auroc")
    tune.set_defaults(func=cmd_rank)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hubtune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the API (and, unless --no-worker, one worker child process)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--no-worker", action="store_true")
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="start a Celery worker alone")
    worker.add_argument("--queues", default="rank,tune")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.add_argument("--loglevel", default="info")
    worker.add_argument("--gpus", default=None, metavar="all|N|ID,ID",
                        help="one worker process per GPU (CUDA_VISIBLE_DEVICES set for each): all visible, the "
                             "first N, or these ids")
    worker.set_defaults(func=cmd_worker)

    sub.add_parser("migrate", help="upgrade the database to the latest schema").set_defaults(func=cmd_migrate)

    _add_keys_commands(sub)

    datasets = sub.add_parser("datasets", help="upload and list datasets").add_subparsers(dest="action", required=True)
    up = with_client(datasets.add_parser("upload"))
    up.add_argument("file")
    up.add_argument("--task", default="classification", choices=["classification", "multilabel", "regression"])
    up.add_argument("--text-column", default=None, help="the column of the texts (default text)")
    up.add_argument("--feature-columns", default=None,
                    help="tables, instead of --text-column: comma-separated columns (or a JSON array) each row is "
                    "written from as one sentence, in this order (LIFT: 'age is 39, workclass is State-gov')")
    up.add_argument("--text-pair-column", default=None,
                    help="text pairs (premise and hypothesis, question and passage): the column of each row's second "
                    "text; models read the two as one pair")
    up.add_argument("--label-column", default="label")
    up.add_argument("--image-column", default=None,
                    help="image datasets: the Parquet column of image bytes, or the column of a zip's metadata.csv "
                    "naming each image file (default file_name); a zip of class folders needs neither")
    ls = with_client(datasets.add_parser("list"))
    ls.add_argument("--limit", type=int, default=50)
    show = with_client(datasets.add_parser("show"))
    show.add_argument("id")
    for p in (up, ls, show):
        p.set_defaults(func=cmd_datasets)

    models = sub.add_parser("models", help="the hub catalog").add_subparsers(dest="action", required=True)
    add = with_client(models.add_parser("add"))
    add.add_argument("--path")
    add.add_argument("--repo-id")
    add.add_argument("--revision")
    add.add_argument("--name")
    add.add_argument("--checkpoint", help="JOB_ID/NAME: a checkpoint of one of your jobs, as your own candidate")
    remove = with_client(models.add_parser("remove", help="take an entry out (admins: any; users: their own)"))
    remove.add_argument("id")
    for p in (add, remove, with_client(models.add_parser("list"))):
        p.set_defaults(func=cmd_models)

    _add_job_commands(sub)

    jobs = sub.add_parser("jobs", help="list, show, watch, cancel, download").add_subparsers(dest="action",
                                                                                              required=True)
    jl = with_client(jobs.add_parser("list"))
    jl.add_argument("--limit", type=int, default=50)
    jl.set_defaults(func=cmd_jobs)
    for action in ("show", "watch", "cancel", "download"):
        p = with_client(jobs.add_parser(action))
        p.add_argument("id")
        if action == "show":
            p.add_argument("--json", action="store_true")
        if action == "download":
            p.add_argument("--out", default="checkpoints")
        p.set_defaults(func=cmd_jobs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from service.client import ApiError

    try:
        return args.func(args, get_settings())
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
