"""Feature extraction: batched forward passes, mean pooling over the attention mask, and a feature cache.

Texts are tokenised once, sorted by length and cut into batches of similar length, so padding stays small;
features come back in the caller's order. float32 on CPU; bf16 autocast on CUDA (fp16 where bf16 is missing).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class FeatureExtractionCancelled(Exception):
    pass


@dataclass
class FeatureResult:
    features: np.ndarray  # (N, D) float32, in input order
    source_probs: np.ndarray | None  # (N, Z) softmax of the model's own classification head, if it has one
    forward_seconds: float  # forward passes only (synchronised on GPU)
    total_seconds: float  # loading + tokenising + forward + pooling
    tokens: int  # real (unpadded) tokens
    padded_tokens: int  # tokens fed to the model, padding included
    num_parameters: int
    device: str

    @property
    def padding_waste(self) -> float:
        return 1.0 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    @property
    def flops_estimate(self) -> float:
        """2 · parameters · tokens: the forward pass's matrix-multiply work, attention's N² term excluded."""
        return 2.0 * self.num_parameters * self.padded_tokens


def pick_device(device: str | None = None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def length_batches(lengths: list[int], batch_size: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Indices grouped into batches of similar length (longest first, so memory peaks early).
    With max_tokens, a batch also stops growing once batch_rows × its longest length would exceed it."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = lengths[order[start]]
        rows = batch_size
        if max_tokens:
            rows = max(1, min(batch_size, max_tokens // max(longest, 1)))
        batches.append(order[start:start + rows])
        start += rows
    return batches


def _load(model_dir: Path, device: str) -> tuple[Any, Any, bool]:
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:  # decoders: any id works, padded positions are masked out
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    has_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])) \
        and bool(getattr(config, "id2label", None))
    loader = AutoModelForSequenceClassification if has_head else AutoModel
    model = loader.from_pretrained(model_dir, dtype=torch.float32)
    model.eval().to(device)
    return tokenizer, model, has_head


def extract_features(model_dir: Path, texts: list[str], *, max_length: int = 128, batch_size: int = 32,
                     device: str | None = None, on_batch: Callable[[int, int], None] | None = None,
                     should_cancel: Callable[[], bool] | None = None) -> FeatureResult:
    import torch

    began = time.perf_counter()
    device = pick_device(device)
    tokenizer, model, has_head = _load(Path(model_dir), device)
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    lengths = [len(ids) for ids in encoded]
    batches = length_batches(lengths, batch_size, max_tokens=batch_size * max_length)
    pad_id = tokenizer.pad_token_id
    on_cuda = device.startswith("cuda")
    amp_dtype = torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float16

    features: np.ndarray | None = None
    probs: np.ndarray | None = None
    forward_seconds, padded = 0.0, 0
    for done, rows in enumerate(batches, start=1):
        if should_cancel is not None and should_cancel():
            raise FeatureExtractionCancelled()
        width = max(lengths[i] for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, :lengths[i]] = torch.tensor(encoded[i])
            mask[r, :lengths[i]] = 1
        padded += len(rows) * width
        input_ids, mask = input_ids.to(device), mask.to(device)
        if on_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cuda", dtype=amp_dtype, enabled=on_cuda):
            out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=has_head)
            hidden = out.hidden_states[-1] if has_head else out.last_hidden_state
            weights = mask.unsqueeze(-1).to(torch.float32)
            pooled = (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            batch_probs = torch.softmax(out.logits.float(), dim=-1) if has_head else None
        if on_cuda:
            torch.cuda.synchronize()
        forward_seconds += time.perf_counter() - start
        pooled_np = pooled.cpu().numpy()
        if features is None:
            features = np.empty((len(texts), pooled_np.shape[1]), dtype=np.float32)
        features[rows] = pooled_np
        if batch_probs is not None:
            if probs is None:
                probs = np.empty((len(texts), batch_probs.shape[1]), dtype=np.float32)
            probs[rows] = batch_probs.cpu().numpy()
        if on_batch is not None:
            on_batch(done, len(batches))
    assert features is not None, "no texts"
    return FeatureResult(features=features, source_probs=probs, forward_seconds=forward_seconds,
                         total_seconds=time.perf_counter() - began, tokens=int(sum(lengths)), padded_tokens=padded,
                         num_parameters=sum(p.numel() for p in model.parameters()), device=device)


class FeatureCache:
    """Features on disk, keyed by what determines them. Entries are folders renamed into place when complete."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @staticmethod
    def key(dataset_tag: str, model_id: str, revision: str, pooling: str, max_length: int) -> str:
        parts = json.dumps([dataset_tag, model_id, revision, pooling, max_length])
        return hashlib.sha256(parts.encode()).hexdigest()[:32]

    def load(self, key: str) -> FeatureResult | None:
        folder = self.root / key
        if not (folder / "meta.json").is_file():
            return None
        meta = json.loads((folder / "meta.json").read_text())
        probs_path = folder / "source_probs.npy"
        return FeatureResult(features=np.load(folder / "features.npy"),
                             source_probs=np.load(probs_path) if probs_path.is_file() else None, **meta)

    def save(self, key: str, result: FeatureResult) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.{uuid.uuid4().hex}.tmp"
        tmp.mkdir()
        try:
            np.save(tmp / "features.npy", result.features)
            if result.source_probs is not None:
                np.save(tmp / "source_probs.npy", result.source_probs)
            meta = {k: getattr(result, k) for k in ("forward_seconds", "total_seconds", "tokens", "padded_tokens",
                                                     "num_parameters", "device")}
            (tmp / "meta.json").write_text(json.dumps(meta))  # written last: its presence marks a whole entry
            try:
                os.replace(tmp, self.root / key)
            except OSError:  # another worker finished the same entry first: theirs is as good
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
