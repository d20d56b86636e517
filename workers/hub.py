"""Resolve a catalog entry to a local model folder: a hub repository pinned to a commit, or a local folder.

No torch or transformers here; huggingface_hub is imported only when a hub model is resolved.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# What AutoModel/AutoTokenizer need: configs, tokenizer files, weights. Top-level files only ("*/*" is ignored):
# sentence-transformers repos carry onnx/, openvino/ copies of the weights that would triple the download.
# No "*.py": remote code is never trusted here.
HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.safetensors"]
HUB_FALLBACK_PATTERNS = ["pytorch_model*.bin"]  # only for repos without safetensors
HUB_IGNORE = ["*/*"]
# Files that decide a local folder's content revision (dotfiles and subfolders are not part of the model).
_MODEL_SUFFIXES = {".json", ".txt", ".model", ".tiktoken", ".safetensors", ".bin", ".gguf"}
_SMALL_FILE = 1 << 20  # hashed in full below this size; larger files by size and modification time
# Sources whose locator is a folder on the server: a registered local folder, a job's tuned checkpoint.
FOLDER_SOURCES = ("local", "checkpoint")


class ModelResolutionError(Exception):
    """The model cannot be made available locally (offline, unknown revision, missing folder)."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    revision: str  # hf: the commit hash the revision resolved to; local: content_revision(path)


def content_revision(folder: Path) -> str:
    """A cheap, stable revision for a local model folder: the bytes of its small files (config, tokenizer) and the
    name, size and modification time of its weight files. It changes whenever a file is added, removed or
    rewritten, and stays the same while nothing is touched (reading 88 MB of weights per resolve would not)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for item in sorted(folder.iterdir(), key=lambda p: p.name):
        if item.name.startswith(".") or item.suffix not in _MODEL_SUFFIXES or not item.is_file():
            continue
        stat = item.stat()  # follows symlinks: a linked package file is described by its target
        digest.update(f"{item.name}\0{stat.st_size}\0".encode())
        if stat.st_size <= _SMALL_FILE:
            digest.update(item.read_bytes())
        else:
            digest.update(f"{stat.st_mtime_ns}\0".encode())
    return "local-" + digest.hexdigest()[:16]


def hub_repo_allowed(repo_id: str, patterns: list[str]) -> bool:
    """Whether HUBTUNE_HUB_ALLOW (fnmatch patterns; none: any repository) lets `repo_id` be used. The hub treats
    ids without regard to case, so patterns do too."""
    return not patterns or any(fnmatch.fnmatchcase(repo_id.lower(), p.lower()) for p in patterns)


def hub_allow_refusal(repo_id: str, patterns: list[str]) -> str:
    return f"{repo_id} matches none of HUBTUNE_HUB_ALLOW ({', '.join(patterns)})"


def download_bytes(files: Iterable[tuple[str, int | None]]) -> int:
    """The bytes _resolve_hf downloads of a repository whose files are (name, size): the top-level files
    HUB_PATTERNS match, and the PyTorch weights when the repository has no safetensors."""
    top = [(name, size or 0) for name, size in files if "/" not in name]

    def matching(patterns: list[str]) -> int:
        return sum(size for name, size in top if any(fnmatch.fnmatchcase(name, p) for p in patterns))

    has_safetensors = any(fnmatch.fnmatchcase(name, "*.safetensors") for name, _ in top)
    return matching(HUB_PATTERNS if has_safetensors else HUB_PATTERNS + HUB_FALLBACK_PATTERNS)


def _size_refusal(where: str, size: int, max_bytes: int) -> str:
    return f"{where} is {size} bytes to download; HUBTUNE_HUB_MAX_BYTES is {max_bytes}"


def _stored_folder(location: str) -> Path:
    """A registered folder as a real one: a path as is, a checkpoint in object storage through the local cache."""
    from service.artifacts import artifact_store, is_remote_location
    from service.settings import get_settings

    if not is_remote_location(location):
        return Path(location)
    try:
        return artifact_store(get_settings()).local_copy_folder(location)
    except (FileNotFoundError, ValueError) as exc:
        raise ModelResolutionError(f"the stored checkpoint {location} is missing or incomplete") from exc


def resolve_model(source: str, *, repo_id: str | None = None, revision: str | None = None, path: str | None = None,
                  cache_dir: Path | None = None) -> ResolvedModel:
    """A local folder AutoModel.from_pretrained can load, with the revision that pins its content.

    source="hf": huggingface_hub.snapshot_download of `repo_id` at `revision` (default "main") into `cache_dir`
    (default: huggingface_hub's cache); the returned revision is the commit hash, so a branch that moves later does
    not silently change cached features. Offline (HF_HUB_OFFLINE=1 or no network) a cached snapshot is used.
    source="local" or "checkpoint": `path` as is; `revision` is ignored and the content revision of the folder
    returned. The hub policy (HUBTUNE_HUB_ALLOW, HUBTUNE_HUB_MAX_BYTES) is read from this process's settings.
    """
    if source in FOLDER_SOURCES:
        folder = _stored_folder(path or "")
        if not (folder / "config.json").is_file():
            raise ModelResolutionError(f"local model folder {folder} is missing or has no config.json")
        return ResolvedModel(folder, content_revision(folder))
    if source != "hf":
        raise ModelResolutionError(f"unknown model source {source!r} (expected 'hf', 'local' or 'checkpoint')")
    if not repo_id:
        raise ModelResolutionError("source 'hf' needs a repo_id")
    return _resolve_hf(repo_id, revision or "main", cache_dir)


def _check_hub_policy(repo_id: str, revision: str) -> int:
    """HUBTUNE_HUB_ALLOW, and HUBTUNE_HUB_MAX_BYTES from the repository's file metadata before anything is
    downloaded (when the hub answers; offline, the cached snapshot is measured instead). Returns the byte cap."""
    from service.settings import get_settings

    settings = get_settings()
    if not hub_repo_allowed(repo_id, settings.hub_allow_patterns):
        raise ModelResolutionError(hub_allow_refusal(repo_id, settings.hub_allow_patterns))
    max_bytes = settings.hub_max_bytes
    if max_bytes <= 0:
        return 0
    from huggingface_hub import HfApi, constants

    if constants.is_offline_mode():
        return max_bytes
    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except Exception:  # the hub unreachable: the download below falls back to the cache, measured after it
        return max_bytes
    size = download_bytes((s.rfilename, s.size) for s in info.siblings or [])
    if size > max_bytes:
        raise ModelResolutionError(_size_refusal(f"{repo_id}@{revision}", size, max_bytes))
    return max_bytes


def _resolve_hf(repo_id: str, revision: str, cache_dir: Path | None) -> ResolvedModel:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    where = f"{repo_id}@{revision}"
    max_bytes = _check_hub_policy(repo_id, revision)

    def download(patterns: list[str], rev: str) -> Path:
        try:
            # Offline, go straight to the cache (some huggingface_hub versions raise instead of falling back
            # when the revision is a commit hash).
            return Path(snapshot_download(repo_id, revision=rev, cache_dir=cache_dir, allow_patterns=patterns,
                                          ignore_patterns=HUB_IGNORE, local_files_only=constants.is_offline_mode()))
        except LocalEntryNotFoundError as exc:
            offline = " (HF_HUB_OFFLINE is set)" if constants.is_offline_mode() else ""
            raise ModelResolutionError(
                f"{where} is not in the local Hugging Face cache and the hub cannot be reached{offline}; "
                f"download it once where the hub is reachable (same cache folder), or register a local folder "
                f"instead") from exc
        except Exception as exc:  # repository or revision not found, gated, incomplete snapshot, network
            raise ModelResolutionError(f"cannot fetch {where}: {type(exc).__name__}: {exc}") from exc

    folder = download(HUB_PATTERNS, revision)
    # Snapshot folders are named by the commit the revision resolved to: that is the pinned revision.
    commit = folder.name
    if not any(folder.glob("*.safetensors")):
        folder = download(HUB_PATTERNS + HUB_FALLBACK_PATTERNS, commit)
    if not (folder / "config.json").is_file():
        raise ModelResolutionError(f"{where} (commit {commit}) has no config.json: not a transformers model")
    if max_bytes:  # what is on disk now, for a snapshot that came from the cache without metadata
        size = download_bytes((p.name, p.stat().st_size) for p in folder.iterdir() if p.is_file())
        if size > max_bytes:
            raise ModelResolutionError(_size_refusal(where, size, max_bytes))
    return ResolvedModel(folder, commit)

