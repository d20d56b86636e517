"""Resolve a catalog entry to a local model folder: a hub repository pinned to a commit, or a local folder.

No torch or transformers here; huggingface_hub is imported only when a hub model is resolved.
"""

from __future__ import annotations

import hashlib
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


def resolve_model(source: str, *, repo_id: str | None = None, revision: str | None = None, path: str | None = None,
                  cache_dir: Path | None = None) -> ResolvedModel:
    """A local folder AutoModel.from_pretrained can load, with the revision that pins its content.

    source="hf": huggingface_hub.snapshot_download of `repo_id` at `revision` (default "main") into `cache_dir`
    (default: huggingface_hub's cache); the returned revision is the commit hash, so a branch that moves later does
    not silently change cached features. Offline (HF_HUB_OFFLINE=1 or no network) a cached snapshot is used.
    source="local": `path` as is; `revision` is ignored and the content revision of the folder returned.
    """
    if source == "local":
        folder = Path(path or "")
        if not (folder / "config.json").is_file():
            raise ModelResolutionError(f"local model folder {folder} is missing or has no config.json")
        return ResolvedModel(folder, content_revision(folder))
    if source != "hf":
        raise ModelResolutionError(f"unknown model source {source!r} (expected 'hf' or 'local')")
    if not repo_id:
        raise ModelResolutionError("source 'hf' needs a repo_id")
    return _resolve_hf(repo_id, revision or "main", cache_dir)


def _resolve_hf(repo_id: str, revision: str, cache_dir: Path | None) -> ResolvedModel:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    where = f"{repo_id}@{revision}"

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
    return ResolvedModel(folder, commit)

