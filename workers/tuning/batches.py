"""Batches for the training loop: texts tokenised once and padded per batch, images decoded per batch, and the
seeded order of each epoch."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

# The batch keys the model's forward takes (the others, labels and index, are the loop's and the pieces').
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")


def epoch_order(seed: int, epoch: int, n: int) -> Tensor:
    """The data order of one epoch: a permutation from its own generator, seeded by (seed, epoch), so a run resumed
    mid-epoch reads the same rows as one that was never interrupted."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + 17) % (2**63 - 1))
    return torch.randperm(n, generator=g)


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}


class EncodedTexts:
    """Texts tokenized once; batches padded on the fly (dynamic padding)."""

    def __init__(self, tokenizer: Any, texts: list[str] | list[tuple[str, str]], labels: np.ndarray,
                 max_length: int, token_types: bool = True) -> None:
        from workers.features import pair_inputs

        # (no texts: a validation split can be empty when every class has one example; tokenizers fail on [])
        inputs = pair_inputs(tokenizer, texts) if len(texts) and isinstance(texts[0], tuple) else (list(texts),)
        enc = tokenizer(*inputs, truncation=True, max_length=max_length) if len(texts) else {"input_ids": []}
        self.input_ids = enc["input_ids"]
        # token_types False: the model has no second token type (features.takes_token_types), whatever the
        # tokenizer declares
        self.token_type_ids = enc.get("token_type_ids") if token_types else None
        self.labels = labels
        self.pad_id = int(tokenizer.pad_token_id)
        self.left = getattr(tokenizer, "padding_side", "right") == "left"

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, index: Tensor, device: torch.device, task: str) -> dict[str, Tensor]:
        rows = index.tolist()
        width = max(len(self.input_ids[i]) for i in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        types = torch.zeros((len(rows), width), dtype=torch.long) if self.token_type_ids is not None else None
        for r, i in enumerate(rows):
            seq = self.input_ids[i]
            sl = slice(width - len(seq), width) if self.left else slice(0, len(seq))
            ids[r, sl] = torch.tensor(seq, dtype=torch.long)
            mask[r, sl] = 1
            if types is not None:
                types[r, sl] = torch.tensor(self.token_type_ids[i], dtype=torch.long)
        y = self.labels[rows]
        labels = torch.as_tensor(y, dtype=torch.long if task == "classification" else torch.float32)
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": index.clone().long()}
        if types is not None:
            out["token_type_ids"] = types
        return {k: v.to(device) for k, v in out.items()}


class AugmentedTexts:
    """Training texts augmented afresh every epoch (workers.tuning.augment) and tokenised then; `set_epoch(e)`
    before reading epoch e's batches. The vocabulary of insertions is the original rows'."""

    def __init__(self, tokenizer: Any, texts: list[str] | list[tuple[str, str]], labels: np.ndarray,
                 max_length: int, token_types: bool, augment: dict[str, Any], seed: int) -> None:
        from workers.tuning.augment import Vocabulary

        self.tokenizer, self.texts, self.labels = tokenizer, list(texts), labels
        self.max_length, self.token_types, self.augment, self.seed = max_length, token_types, augment, seed
        self.vocabulary = Vocabulary.of(self.texts)
        self.epoch = -1
        self.encoded: EncodedTexts | None = None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        from workers.tuning.augment import augment_rows

        if epoch == self.epoch:
            return
        rows = augment_rows(self.texts, self.augment["name"], self.augment["p"], self.seed, epoch, self.vocabulary)
        self.encoded = EncodedTexts(self.tokenizer, rows, self.labels, self.max_length, self.token_types)
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.texts)

    def batch(self, index: Tensor, device: torch.device, task: str) -> dict[str, Tensor]:
        assert self.encoded is not None
        return self.encoded.batch(index, device, task)


class EncodedImages:
    """Encoded images, decoded and run through the model's image processor per batch (holding every image as
    224×224 floats would take 0.6 MB each)."""

    def __init__(self, processor: Any, images: list[bytes], labels: np.ndarray, mode: str) -> None:
        self.processor, self.images, self.labels, self.mode = processor, images, labels, mode

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, index: Tensor, device: torch.device, task: str) -> dict[str, Tensor]:
        from workers.features import decode_images

        rows = index.tolist()
        pixels = self.processor(images=decode_images([self.images[i] for i in rows], self.mode),
                                return_tensors="pt")["pixel_values"]
        labels = torch.as_tensor(self.labels[rows], dtype=torch.long if task == "classification" else torch.float32)
        out = {"pixel_values": pixels, "labels": labels, "index": index.clone().long()}
        return {k: v.to(device) for k, v in out.items()}


Batches = EncodedTexts | AugmentedTexts | EncodedImages
