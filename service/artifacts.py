"""Where artifacts live: one store interface, a local folder (the embedded default) or S3-compatible storage.

Keys are relative POSIX paths: `datasets/<id>/data.parquet`, `jobs/<id>/checkpoints/<name>/<file>`,
`features/<key>/<file>`. A key's parts never start with "." (those names are a writer's work in progress).

Atomicity, so a crashed writer leaves nothing anyone reads as complete:
- one object: the local store writes a hidden temporary file and renames it into place; S3 makes an object
  visible only when its single PUT or its multipart upload's CompleteMultipartUpload succeeds (an upload that
  never completes is not listed and cannot be read);
- a folder (`put_folder`): the local store renames a whole folder into place; S3 uploads the files and writes
  the folder's manifest (MANIFEST, the files with their sizes) last, and readers (`folder_complete`,
  `local_folder`) treat a folder without its manifest as absent.

Readers that need a real file (pyarrow, transformers, numpy) ask for `local_file` / `local_folder`: the local store
returns its own path; S3 downloads into a local disk cache with a size cap (`DiskCache`, least recently used
entries evicted first), because object storage is slower than a disk.

Torch-free: the API process imports this module. boto3 is imported only when an S3 store is built.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO
from urllib.parse import urlparse

MANIFEST = "MANIFEST"  # written last in an S3 folder: the files and their sizes
CHUNK = 1024 * 1024  # bytes per read when streaming an object
PART = 8 * 1024 * 1024  # multipart threshold and part size: the bounded buffer of an upload


class ArtifactStoreUnavailable(Exception):
    """The object store did not answer, refused the credentials or failed: the API answers 503, a job fails."""


def _translated(method: Callable[..., Any]) -> Callable[..., Any]:
    """S3 errors other than "no such key" (handled where absence is an answer) as ArtifactStoreUnavailable."""

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return method(*args, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise ArtifactStoreUnavailable(f"object storage: {type(exc).__name__}: {exc}") from exc

    return call


def checked_key(key: str) -> str:
    """A key as stored, or ValueError for one that could leave the store or name a writer's temporary."""
    parts = key.split("/")
    if not key or "\\" in key or "\x00" in key or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise ValueError(f"not an artifact key: {key!r}")
    return key


def _prefix(prefix: str) -> str:
    return checked_key(prefix.rstrip("/")) + "/" if prefix.strip("/") else ""


class ArtifactStore(ABC):
    """What the API and the workers do with artifacts; see the module docstring for keys and atomicity."""

    remote: bool  # False: keys are files under a local folder every process here reads directly

    @abstractmethod
    def location(self, key: str) -> str:
        """Where the key is, as recorded in the database: a local path, or s3://bucket/prefix/key."""

    @abstractmethod
    def key_of(self, location: str) -> str:
        """The key of a location this store recorded (ValueError for another store's)."""

    @abstractmethod
    def put_file(self, key: str, path: Path, *, move: bool = False) -> int:
        """Store the file at `path` under `key` atomically (move: the file may be consumed); its size."""

    @abstractmethod
    def put_stream(self, key: str, stream: BinaryIO) -> int:
        """Store what `stream` reads under `key` atomically, holding at most a part in memory; its size."""

    @abstractmethod
    def put_folder(self, prefix: str, folder: Path) -> list[str]:
        """Store every file below `folder` under `prefix`, visible as a whole only once all are stored."""

    @abstractmethod
    def folder_complete(self, prefix: str) -> bool:
        """Whether a whole folder is stored under `prefix` (put_folder finished)."""

    @abstractmethod
    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The object's bytes from `start` to `end` inclusive (None: to the end), in chunks."""

    @abstractmethod
    def size(self, key: str) -> int | None:
        """The object's size, or None when there is none."""

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """The keys of the complete objects below `prefix`, sorted."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object below `prefix`; how many."""

    @abstractmethod
    def local_file(self, key: str) -> Path:
        """A real file holding the object (FileNotFoundError when there is none)."""

    @abstractmethod
    def local_folder(self, prefix: str) -> Path:
        """A real folder holding the whole folder stored under `prefix` (FileNotFoundError when there is none)."""

    def local_copy(self, location: str) -> Path:
        """A real file for a location recorded in the database (a dataset's storage_path)."""
        return self.local_file(self.key_of(location))

    def local_copy_folder(self, location: str) -> Path:
        """A real folder for a folder location recorded in the database (a checkpoint's path)."""
        return self.local_folder(self.key_of(location))


class LocalStore(ArtifactStore):
    """Keys are files under `root` (HUBTUNE_HOME/artifacts): the paths HubTune has always used."""

    remote = False

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / checked_key(key)

    def location(self, key: str) -> str:
        return str(self.path(key))

    def key_of(self, location: str) -> str:
        relative = Path(location).relative_to(self.root)  # ValueError outside the store
        return checked_key(relative.as_posix())

    def _tmp(self, target: Path) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        return target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")

    def put_file(self, key: str, path: Path, *, move: bool = False) -> int:
        target = self.path(key)
        tmp = self._tmp(target)
        try:
            if move:
                os.replace(path, tmp)  # same file system in the embedded layout: no copy
            else:
                shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        return target.stat().st_size

    def put_stream(self, key: str, stream: BinaryIO) -> int:
        target = self.path(key)
        tmp = self._tmp(target)
        try:
            with tmp.open("wb") as out:
                shutil.copyfileobj(stream, out, CHUNK)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return target.stat().st_size

    def put_folder(self, prefix: str, folder: Path) -> list[str]:
        target = self.path(prefix)
        if Path(folder).resolve() != target.resolve():  # a folder written in place is already whole
            tmp = self._tmp(target)
            try:
                shutil.copytree(folder, tmp)
                if target.exists():
                    shutil.rmtree(target)
                os.replace(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return self.list(prefix)

    def folder_complete(self, prefix: str) -> bool:
        return self.path(prefix).is_dir()

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        with self.path(key).open("rb") as fh:
            fh.seek(start)
            left = None if end is None else end - start + 1
            while left is None or left > 0:
                chunk = fh.read(CHUNK if left is None else min(CHUNK, left))
                if not chunk:
                    return
                if left is not None:
                    left -= len(chunk)
                yield chunk

    def size(self, key: str) -> int | None:
        path = self.path(key)
        return path.stat().st_size if path.is_file() else None

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / _prefix(prefix) if prefix.strip("/") else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # a writer's temporary folder
            for name in filenames:
                if not name.startswith("."):
                    keys.append((Path(dirpath) / name).relative_to(self.root).as_posix())
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        shutil.rmtree(self.root / _prefix(prefix), ignore_errors=True)
        return len(keys)

    def local_file(self, key: str) -> Path:
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        return path

    def local_folder(self, prefix: str) -> Path:
        path = self.path(prefix)
        if not path.is_dir():
            raise FileNotFoundError(prefix)
        return path

    def local_copy(self, location: str) -> Path:
        return Path(location)  # recorded as a path, possibly by an older HOME: read where it is

    def local_copy_folder(self, location: str) -> Path:
        return Path(location)


class DiskCache:
    """Local copies of remote objects and folders, at most `max_bytes` together (0: no cap).

    Each entry is one folder below `root` named by a hash of its key, so eviction removes whole entries (a model
    folder is never left half there); a hit touches the entry, and the least recently used go first. A process
    reading an entry another evicts keeps its open files (POSIX unlink)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root, self.max_bytes = Path(root), max_bytes
        self._lock = threading.Lock()

    def entry(self, name: str) -> Path:
        return self.root / hashlib.sha256(name.encode()).hexdigest()[:32]

    def get(self, name: str, fill: Callable[[Path], None]) -> Path:
        """The entry's folder, filled by `fill(folder)` into a temporary folder first when absent."""
        folder = self.entry(name)
        if folder.is_dir():
            os.utime(folder)
            return folder
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{folder.name}.{uuid.uuid4().hex}.tmp"
        tmp.mkdir()
        try:
            fill(tmp)
            try:
                os.replace(tmp, folder)
            except OSError:  # another process filled the same entry first: theirs is as good
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.evict(keep=folder)
        return folder

    def evict(self, keep: Path | None = None) -> None:
        if not self.max_bytes:
            return
        with self._lock:
            entries = []
            for entry in self.root.iterdir():
                if entry.name.startswith(".") or not entry.is_dir():
                    continue
                try:
                    size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
                    entries.append((entry.stat().st_mtime, size, entry))
                except OSError:  # evicted meanwhile by another process
                    continue
            total = sum(size for _, size, _ in entries)
            for _, size, entry in sorted(entries):
                if total <= self.max_bytes:
                    break
                if entry != keep:
                    shutil.rmtree(entry, ignore_errors=True)
                    total -= size


class S3Store(ArtifactStore):
    """Keys are objects below s3://bucket/prefix/. Endpoint and credentials come from the standard AWS variables
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), which boto3 reads itself."""

    remote = True

    def __init__(self, url: str, cache: DiskCache, *, timeout_seconds: float = 10.0) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"HUBTUNE_ARTIFACTS_URL must be s3://bucket/prefix, not {url!r}")
        self.bucket, self.base = parsed.netloc, _prefix(parsed.path.strip("/"))
        self.url, self.cache = f"s3://{self.bucket}/{self.base}", cache
        # a custom endpoint (MinIO, moto, Ceph) is addressed by path: bucket names are not host names there
        style = "path" if os.environ.get("AWS_ENDPOINT_URL") else "auto"
        self.client = boto3.session.Session().client("s3", config=Config(
            connect_timeout=timeout_seconds, read_timeout=timeout_seconds * 3,
            retries={"max_attempts": 3, "mode": "standard"}, s3={"addressing_style": style}))
        self.transfer = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=4)

    def _name(self, key: str) -> str:
        return self.base + checked_key(key)

    def location(self, key: str) -> str:
        return self.url + checked_key(key)

    def key_of(self, location: str) -> str:
        if not location.startswith(self.url):
            raise ValueError(f"{location!r} is not in {self.url}")
        return checked_key(location[len(self.url):])

    @_translated
    def ensure_bucket(self) -> None:
        """Create the bucket when it does not exist (a fresh MinIO or test server)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            try:
                self.client.create_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    @_translated
    def put_file(self, key: str, path: Path, *, move: bool = False) -> int:
        size = Path(path).stat().st_size
        self.client.upload_file(str(path), self.bucket, self._name(key), Config=self.transfer)
        if move:
            Path(path).unlink(missing_ok=True)
        return size

    @_translated
    def put_stream(self, key: str, stream: BinaryIO) -> int:
        counted = _CountingReader(stream)
        self.client.upload_fileobj(counted, self.bucket, self._name(key), Config=self.transfer)
        return counted.count

    @_translated
    def put_folder(self, prefix: str, folder: Path) -> list[str]:
        prefix = _prefix(prefix)
        self.delete_prefix(prefix)  # a folder written again (a job re-run) is whole again only with its manifest
        files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
        manifest = {}
        for path in files:
            relative = path.relative_to(folder).as_posix()
            manifest[relative] = self.put_file(prefix + relative, path)
        body = json.dumps({"files": manifest}).encode()
        self.client.put_object(Bucket=self.bucket, Key=self._name(prefix + MANIFEST), Body=body)
        return [prefix + r for r in manifest]

    def _manifest(self, prefix: str) -> dict[str, int] | None:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._name(_prefix(prefix) + MANIFEST))["Body"]
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        return json.loads(body.read())["files"]

    @_translated
    def folder_complete(self, prefix: str) -> bool:
        return self._manifest(prefix) is not None

    @_translated
    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        # the GET is sent now, so that a store that is down fails the call, not the stream it would start
        extra = {"Range": f"bytes={start}-{'' if end is None else end}"} if start or end is not None else {}
        body = self.client.get_object(Bucket=self.bucket, Key=self._name(key), **extra)["Body"]

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(CHUNK)
            finally:
                body.close()

        return chunks()

    @_translated
    def size(self, key: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._name(key))["ContentLength"])
        except ClientError as exc:
            if _missing(exc):
                return None
            raise

    @_translated
    def list(self, prefix: str = "") -> list[str]:
        keys = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.base + _prefix(prefix)):
            keys.extend(item["Key"][len(self.base):] for item in page.get("Contents", []))
        return sorted(keys)

    @_translated
    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self._name(k)} for k in keys[start:start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)

    @_translated
    def local_file(self, key: str) -> Path:
        from botocore.exceptions import ClientError

        name = PurePosixPath(checked_key(key)).name

        def fill(folder: Path) -> None:
            try:
                self.client.download_file(self.bucket, self._name(key), str(folder / name), Config=self.transfer)
            except ClientError as exc:
                raise FileNotFoundError(key) if _missing(exc) else exc from None

        return self.cache.get(self.location(key), fill) / name

    @_translated
    def local_folder(self, prefix: str) -> Path:
        prefix = _prefix(prefix)
        manifest = self._manifest(prefix)
        if manifest is None:
            raise FileNotFoundError(prefix)

        def fill(folder: Path) -> None:
            from botocore.exceptions import ClientError

            for relative in manifest:
                target = folder / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.client.download_file(self.bucket, self._name(prefix + relative), str(target),
                                              Config=self.transfer)
                except ClientError as exc:  # the folder is being written again: absent until its manifest is back
                    raise FileNotFoundError(prefix) if _missing(exc) else exc from None

        # the manifest's content names the entry: a folder written again is fetched again
        digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
        return self.cache.get(f"{self.location(prefix.rstrip('/'))}#{digest}", fill)


class _CountingReader:
    """A file-like reader that counts the bytes read through it (upload_fileobj reads it part by part)."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.count = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.count += len(data)
        return data


def _missing(exc: Any) -> bool:
    error = exc.response.get("Error", {})
    return str(error.get("Code")) in ("404", "NoSuchKey", "NotFound") or \
        exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404


@lru_cache(maxsize=8)
def _store(url: str, root: str, cache_dir: str, cache_max_bytes: int) -> ArtifactStore:
    if not url:
        return LocalStore(Path(root))
    return S3Store(url, DiskCache(Path(cache_dir) / "objects", cache_max_bytes))


def artifact_store(settings: Any) -> ArtifactStore:
    """The store these settings name (service.settings.Settings): one per process and configuration."""
    return _store(settings.artifacts_url, str(settings.artifacts_dir), str(settings.cache_root_dir),
                  settings.cache_max_bytes)


def is_remote_location(location: str) -> bool:
    return location.startswith("s3://")


def dataset_key(dataset_id: str) -> str:
    return f"datasets/{dataset_id}/data.parquet"


def checkpoint_prefix(job_id: str, name: str) -> str:
    return f"jobs/{job_id}/checkpoints/{name}"


def publish_checkpoint(store: ArtifactStore, job_id: str, name: str, folder: Path) -> str:
    """Store a finished checkpoint folder; the location its row records (locally: the folder, written in place)."""
    if not store.remote:
        return str(folder)
    prefix = checkpoint_prefix(job_id, name)
    store.put_folder(prefix, folder)
    return store.location(prefix)


def ensure_artifact_store(settings: Any) -> ArtifactStore:
    """The store, its bucket created when it does not exist yet (a fresh MinIO): called as a process starts."""
    store = artifact_store(settings)
    if isinstance(store, S3Store):
        store.ensure_bucket()
    return store
