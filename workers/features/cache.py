"""Features on disk (`FeatureCache`), keyed by what determines them; CACHE_FORMAT is part of every key."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from workers.features.result import POOLING, FeatureResult

if TYPE_CHECKING:
    from service.artifacts import ArtifactStore

# Part of every cache key: bump when what extract_features computes (or the entry layout) changes.
CACHE_FORMAT = 7  # 3: each text read once (workers.pipeline.distinct_examples); 4: encoder-decoders read through
# their encoder (BART gave decoder states), images brought to 8 bits with transparency over white (eight_bit);
# 5: classifier checkpoints of encoder-decoders and dual encoders read through their backbone (`backbone`);
# 6: images' "head" pooling is the input of the architecture's image classifier (`load_image_model`);
# 7: texts keep every layer's pooled state (layer_features.npy)

_ARRAYS = ("features", "source_probs", "layer_features")  # each in its own .npy; the rest in meta.json
_META_FIELDS = [f.name for f in fields(FeatureResult) if f.name not in _ARRAYS]


class FeatureCache:
    """Features on disk, keyed by what determines them. An entry is a folder (features.npy, source_probs.npy when
    the model has a head, meta.json) written under a temporary name and renamed into place when complete, so a crash
    leaves no half-written entry under a real key; concurrent writers of the same key both leave a whole entry.

    With object storage (`store`, service.artifacts), entries live there under features/<key>: written in `root`
    first, then uploaded with their manifest last (a crashed worker's entry is absent), and read through the
    store's local cache with its size cap."""

    def __init__(self, root: Path, store: ArtifactStore | None = None) -> None:
        self.root = Path(root)
        self.store = store if store is not None and store.remote else None

    @classmethod
    def configured(cls, root: Path) -> FeatureCache:
        """The cache this process's settings name: in object storage when HUBTUNE_ARTIFACTS_URL is set."""
        from service.artifacts import artifact_store
        from service.settings import get_settings

        settings = get_settings()
        return cls(root, artifact_store(settings) if settings.remote_artifacts else None)

    @staticmethod
    def key(dataset_sha256: str, model_id: str, revision: str, pooling: str = POOLING, max_length: int = 128) -> str:
        """Deterministic key: dataset content (plus any sample tag), model and its pinned revision, pooling,
        max length, and this module's CACHE_FORMAT."""
        parts = json.dumps([CACHE_FORMAT, dataset_sha256, model_id, revision, pooling, int(max_length)])
        return hashlib.sha256(parts.encode()).hexdigest()[:32]

    def _folder(self, key: str) -> Path | None:
        if self.store is None:
            return self.root / key
        try:
            return self.store.local_folder(f"features/{key}")
        except FileNotFoundError:
            return None

    def load(self, key: str) -> FeatureResult | None:
        """The stored result, or None when there is no whole entry for this key."""
        folder = self._folder(key)
        if folder is None:
            return None
        try:
            meta = json.loads((folder / "meta.json").read_text())
            features = np.load(folder / "features.npy")
            optional = {name: np.load(folder / f"{name}.npy") if (folder / f"{name}.npy").is_file() else None
                        for name in ("source_probs", "layer_features")}
        except (OSError, ValueError):
            return None
        known = {k: meta[k] for k in _META_FIELDS if k in meta}
        return FeatureResult(features=features, **optional, **known)

    def save(self, key: str, result: FeatureResult) -> None:
        """Store result under key: written under a temporary name, then renamed into place (or uploaded)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.{uuid.uuid4().hex}.tmp"
        tmp.mkdir()
        try:
            np.save(tmp / "features.npy", np.ascontiguousarray(result.features, dtype=np.float32))
            if result.source_probs is not None:
                np.save(tmp / "source_probs.npy", np.ascontiguousarray(result.source_probs, dtype=np.float32))
            if result.layer_features is not None:
                np.save(tmp / "layer_features.npy", np.ascontiguousarray(result.layer_features, dtype=np.float16))
            meta = {k: getattr(result, k) for k in _META_FIELDS}
            (tmp / "meta.json").write_text(json.dumps(meta))
            if self.store is not None:
                self.store.put_folder(f"features/{key}", tmp)
                return
            try:
                os.replace(tmp, self.root / key)
            except OSError:  # another worker finished the same entry first: theirs is as good
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
