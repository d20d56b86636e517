"""Resolve a catalog entry to a local model folder: a hub repository pinned to a revision, or a local folder.

No torch here; huggingface_hub is imported only when a hub model is resolved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Only what AutoModel/AutoTokenizer need: configs, tokenizers, weights (safetensors preferred, .bin as fallback).
HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors", "*.bin", "*.tiktoken", "*.py"]


class ModelResolutionError(Exception):
    """The model cannot be made available locally (offline, unknown revision, missing folder)."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    revision: str  # hub: the commit hash the revision resolved to; local: as registered


def resolve_model(source: str, *, repo_id: str | None = None, revision: str | None = None, path: str | None = None,
                  cache_dir: Path | None = None) -> ResolvedModel:
    if source == "local":
        folder = Path(path or "")
        if not (folder / "config.json").is_file():
            raise ModelResolutionError(f"local model folder {folder} is missing or has no config.json")
        return ResolvedModel(folder, revision or "local")
    if source != "hf":
        raise ModelResolutionError(f"unknown model source {source!r}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id=repo_id, revision=revision or "main", cache_dir=cache_dir,
                                        allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError as exc:
        raise ModelResolutionError(
            f"{repo_id}@{revision or 'main'} is not in the local cache and the hub cannot be reached "
            f"(offline: HF_HUB_OFFLINE or no network); register a local folder instead") from exc
    except Exception as exc:  # repository/revision not found, auth, network
        raise ModelResolutionError(f"cannot download {repo_id}@{revision or 'main'}: {exc}") from exc
    # snapshot folders are named by the commit hash the revision resolved to: that is the pinned revision.
    return ResolvedModel(folder, folder.name)
