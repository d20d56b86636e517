"""Texts to features: tokenising (`encode`, text pairs through `pair_inputs`), batching by length, the token ids one
job's candidates share (`TokenIdsCache`), tokenising ahead of the model (`text_chunks`), and the forward passes.

Texts are tokenised once (fast tokenizer, no padding), sorted by length and cut into batches of similar length, so
padding stays small; features come back in the caller's order. Beside a GPU the texts are tokenised and padded in
chunks by a thread ahead of the forward passes, each chunk sorted on its own (`text_chunks`): on a fast GPU
tokenising bounds small models, and this way it overlaps the forward passes. A job's candidates that share a
tokenizer reuse its ids (`TokenIdsCache`).
Mean pooling over the attention mask of the last hidden state, for encoders and decoders alike (decoders are padded
on the right, so under a causal mask padding never reaches a real token). float32 on CPU; bf16 autocast on CUDA
(fp16 where bf16 is missing).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.contract import TOKENIZER_FILES
from workers.features.adapters import (
    BackboneOutput,
    check_pooling,
    is_decoder_only,
    last_hidden,
    length_limit,
    load_text_model,
    pool_text_output,
    takes_token_types,
)
from workers.features.flops import text_forward_flops
from workers.features.result import POOLING, FeatureExtractionCancelled, FeatureResult, FeatureRows
from workers.features.runtime import ForwardClock, autocast_dtype, pick_device, prepared_in_order


def length_batches(lengths: list[int] | np.ndarray, batch_size: int,
                   max_tokens: int | None = None) -> list[np.ndarray]:
    """Indices grouped into batches of similar length: sorted longest first (memory peaks on the first batch, so
    an out-of-memory error comes at once), then chunked. With max_tokens, a batch also stops growing once
    rows × its longest length would exceed it."""
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        rows = batch_size
        if max_tokens:
            rows = max(1, min(batch_size, max_tokens // max(int(lengths[order[start]]), 1)))
        batches.append(order[start:start + rows])
        start += rows
    return batches


TOKENIZE_CHUNK_BATCHES = 8  # batches per chunk tokenised ahead, once past the first chunks (1, 2, 4 batches)


def characters(example: str | tuple[str, str]) -> int:
    """Characters of a text, or of both texts of a pair."""
    return len(example) if isinstance(example, str) else sum(map(len, example))


def text_chunks(texts: list[str], batch_size: int, ahead: bool, bucket_by_length: bool = True) -> list[np.ndarray]:
    """Positions of the texts tokenised and bucketed together, in the order they are run. Inline (ahead False): one
    chunk, so bucketing sorts every text. Ahead: chunks of 1, 2, 4, then TOKENIZE_CHUNK_BATCHES batches' worth of
    texts, so the model waits for one batch's tokenising only and each later chunk is tokenised while the one before
    runs. Ahead with bucketing, the texts are first ordered by character length, longest first (token counts are
    not known before tokenising, and characters track them): a chunk then holds texts of similar length, so sorting
    each chunk on its own pads almost as little as one global sort, and the longest batch still comes first."""
    if not ahead:
        return [np.arange(len(texts))]
    if bucket_by_length:
        order = np.argsort(-np.fromiter(map(characters, texts), dtype=np.int64, count=len(texts)), kind="stable")
    else:
        order = np.arange(len(texts))
    chunks: list[np.ndarray] = []
    start, batches = 0, 1
    while start < len(texts):
        chunks.append(order[start:start + batches * batch_size])
        start, batches = start + len(chunks[-1]), min(2 * batches, TOKENIZE_CHUNK_BATCHES)
    return chunks


def tokenizer_fingerprint(model_dir: Path) -> str | None:
    """sha256 over the folder's tokenizer files, names and bytes, and the config's model_type and tokenizer_class
    (which pick the tokenizer class when tokenizer_config.json does not: BERT and MPNet read the same vocab.txt with
    other special tokens): folders that agree here tokenise alike. None when the folder has no tokenizer file (a
    tokenizer from elsewhere: nothing to compare)."""
    digest, found = hashlib.sha256(), False
    for name in TOKENIZER_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
            found = True
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    if isinstance(config, dict):
        digest.update(json.dumps([config.get("model_type"), config.get("tokenizer_class")]).encode())
    return digest.hexdigest() if found else None


class TokenIdsCache:
    """Token ids of one job's texts per tokenizer, so candidates that share one (fine-tunes of a base model,
    MiniLM-L3 and -L6) tokenise the texts once: beside a GPU tokenising costs as much as a small model's forward
    passes. Keyed by `tokenizer_fingerprint` and max_length; holds at most max_tokens ids (int32, 4 bytes each), past
    which it stops storing. Bound to one list of texts (its length is checked); used by one thread at a time."""

    def __init__(self, count: int, max_tokens: int = 20_000_000) -> None:
        self.count, self.max_tokens, self.stored = count, max_tokens, 0
        self._ids: dict[str, list[np.ndarray | None]] = {}
        self.reused = 0  # texts whose ids came from the cache

    def encode(self, key: str, tokenizer: Any, texts: list[str], positions: np.ndarray,
               max_length: int) -> list[np.ndarray]:
        """`encode` of texts[positions], reusing the ids stored under key and storing the new ones."""
        if len(texts) != self.count:
            raise ValueError(f"TokenIdsCache holds {self.count} texts, got {len(texts)}")
        entry = self._ids.setdefault(key, [None] * self.count)
        missing = [int(i) for i in positions if entry[i] is None]
        self.reused += len(positions) - len(missing)
        fresh = [np.asarray(ids, dtype=np.int32)
                 for ids in (encode(tokenizer, [texts[i] for i in missing], max_length) if missing else [])]
        size = sum(ids.size for ids in fresh)
        if self.stored + size <= self.max_tokens:
            self.stored += size
            for i, ids in zip(missing, fresh):
                entry[i] = ids
            return [entry[int(i)] for i in positions]  # type: ignore[misc]
        new = dict(zip(missing, fresh))
        return [new[int(i)] if int(i) in new else entry[int(i)] for i in positions]  # type: ignore[misc]


@dataclass
class TokenBatch:
    rows: np.ndarray  # positions of its texts in the caller's list
    lengths: np.ndarray  # real tokens of each row
    input_ids: Any  # (rows, width) torch.long, right-padded
    attention_mask: Any  # (rows, width) torch.long
    token_type_ids: Any | None = None  # (rows, width) torch.long: text pairs whose tokenizer declares token types


def token_batches(tokenizer: Any, texts: list[str], chunk: np.ndarray, *, max_length: int, batch_size: int,
                  max_tokens: int | None = None, bucket_by_length: bool = True, multiple: int = 1,
                  pin_memory: bool = False, token_ids: tuple[TokenIdsCache, str] | None = None) -> list[TokenBatch]:
    """The texts at positions `chunk`, tokenised (`encode`, or through token_ids: a cache and its key), grouped by
    length (`length_batches`, or in order with bucket_by_length=False) and padded on the right with the tokenizer's
    pad id to each batch's longest row, rounded up to a multiple of `multiple` (never past max_length unless a row
    is longer)."""
    import torch

    if token_ids is None:
        encoded: list[Any] = encode(tokenizer, [texts[i] for i in chunk], max_length)
    else:
        encoded = token_ids[0].encode(token_ids[1], tokenizer, texts, chunk, max_length)
    typed = bool(encoded) and np.ndim(encoded[0]) == 2  # text pairs' rows: ids over token type ids
    lengths = np.fromiter((len(row[0]) if typed else len(row) for row in encoded), dtype=np.int64,
                          count=len(encoded))
    if bucket_by_length:
        groups = length_batches(lengths, batch_size, max_tokens=max_tokens)
    else:
        groups = [np.arange(i, min(i + batch_size, len(encoded))) for i in range(0, len(encoded), batch_size)]
    batches = []
    for rows in groups:
        width = int(lengths[rows].max())
        width = min(-(-width // multiple) * multiple, max(max_length, width))
        mask = np.arange(width) < lengths[rows, None]
        ids = np.full((len(rows), width), tokenizer.pad_token_id, dtype=np.int64)
        ids[mask] = np.concatenate([np.asarray(encoded[i][0] if typed else encoded[i], dtype=np.int64)
                                    for i in rows])
        input_ids, attention_mask = torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))
        token_types = None
        if typed:
            types = np.zeros((len(rows), width), dtype=np.int64)
            types[mask] = np.concatenate([encoded[i][1] for i in rows])
            token_types = torch.from_numpy(types)
        if pin_memory:  # page-locked, so the copy to the GPU is asynchronous
            input_ids, attention_mask = input_ids.pin_memory(), attention_mask.pin_memory()
            token_types = None if token_types is None else token_types.pin_memory()
        batches.append(TokenBatch(rows=chunk[rows], lengths=lengths[rows], input_ids=input_ids,
                                  attention_mask=attention_mask, token_type_ids=token_types))
    return batches


def padded_tokens(lengths: list[int] | np.ndarray, batches: list[np.ndarray]) -> int:
    """Tokens fed to the model when each batch is padded to its longest member."""
    lengths = np.asarray(lengths)
    return int(sum(len(rows) * int(lengths[rows].max()) for rows in batches if len(rows)))


# Tokenising a long text costs time in proportion to its characters, yet only its first max_length tokens are kept.
# A prefix of CHARS_PER_TOKEN·max_length + CUT_WINDOW characters holds them for any natural text (English averages
# about 4.5 characters per token); the window keeps the cut away from the tokens kept.
CHARS_PER_TOKEN = 8
CUT_WINDOW = 256


def pair_inputs(tokenizer: Any, pairs: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """The two text lists a tokenizer is called with for pairs. A tokenizer whose template puts nothing between the
    two (GPT-2, Llama and other decoders concatenate their ids) gets its separator token, else a line break, at the
    start of each second text, so a model can tell where one ends; BERT-like templates ([SEP]) are left as they are.
    Features and tuning both go through this, so a model reads pairs the same way in each."""
    firsts = [a for a, _ in pairs]
    seconds = [b for _, b in pairs]
    try:
        between = tokenizer.num_special_tokens_to_add(pair=True) - tokenizer.num_special_tokens_to_add(pair=False)
    except (AttributeError, NotImplementedError, ValueError):
        between = 1
    if between <= 0:
        joint = f"{tokenizer.sep_token} " if getattr(tokenizer, "sep_token", None) else "\n"
        seconds = [joint + b for b in seconds]
    return firsts, seconds


def encode(tokenizer: Any, texts: list[str] | list[tuple[str, str]], max_length: int) -> list[Any]:
    """Token ids of each text, truncated to max_length (special tokens included), no padding.

    Same ids as tokenising the whole texts: texts are cut to a prefix first, and any text whose kept tokens reach
    within CUT_WINDOW characters of the cut (short of max_length, or unusually long tokens) is tokenised whole.
    Text pairs (tuples) are encoded as the tokenizer's pair (`pair_inputs`; the longer side truncated first), whole:
    which side loses the odd token depends on the sides' full token counts, which a prefix cannot tell. A row is
    then a (2, length) int32 array of ids and token type ids when the tokenizer declares token type ids (BERT: 0
    for the first text, 1 for the second), else its ids; whether the model gets the types is `takes_token_types`.
    """
    texts = list(texts)
    if texts and isinstance(texts[0], tuple):
        return _encode_pairs(tokenizer, texts, max_length)  # type: ignore[arg-type]
    options = dict(truncation=True, max_length=max_length, return_attention_mask=False, return_token_type_ids=False)
    if not getattr(tokenizer, "is_fast", False):
        return tokenizer(texts, **options)["input_ids"]
    cut = CHARS_PER_TOKEN * max_length + CUT_WINDOW
    enc = tokenizer([t[:cut] for t in texts], return_offsets_mapping=True, **options)
    ids: list[list[int]] = enc["input_ids"]
    redo = [i for i, text in enumerate(texts)
            if len(text) > cut and max((end for _, end in enc["offset_mapping"][i]), default=cut) > cut - CUT_WINDOW]
    if redo:
        whole = tokenizer([texts[i] for i in redo], **options)["input_ids"]
        for i, row in zip(redo, whole):
            ids[i] = row
    return ids


def _encode_pairs(tokenizer: Any, pairs: list[tuple[str, str]], max_length: int) -> list[Any]:
    types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    enc = tokenizer(*pair_inputs(tokenizer, pairs), truncation=True, max_length=max_length,
                    return_attention_mask=False, return_token_type_ids=types)
    if not types:
        return enc["input_ids"]
    return [np.array(row, dtype=np.int32) for row in zip(enc["input_ids"], enc["token_type_ids"])]


class _TextForward:
    """One loaded model's forward passes over token batches: pooled features and source-head probabilities, timed
    by `clock` (CUDA autocast on a GPU)."""

    def __init__(self, model: Any, has_head: bool, device: str, pooling: str) -> None:
        self.model, self.has_head, self.device, self.pooling = model, has_head, device, pooling
        self.last_token = pooling == "head" and is_decoder_only(model.config)
        self.token_types = takes_token_types(model.config)
        self.on_cuda = device.startswith("cuda")
        self.amp_dtype = autocast_dtype(self.on_cuda)
        self.clock = ForwardClock(self.on_cuda)

    def __call__(self, batch: TokenBatch, base_output: BackboneOutput) -> tuple[Any, Any | None, Any | None]:
        """(pooled (B, D), probs (B, Z) or None, every hidden state pooled (B, L + 1, D) or None) of one batch, on
        the device."""
        import torch

        input_ids = batch.input_ids.to(self.device, non_blocking=True)
        mask = batch.attention_mask.to(self.device, non_blocking=True)
        extra = {} if batch.token_type_ids is None or not self.token_types else {
            "token_type_ids": batch.token_type_ids.to(self.device, non_blocking=True)}
        with self.clock.timing(), torch.inference_mode(), \
                torch.autocast("cuda", dtype=self.amp_dtype, enabled=self.on_cuda):
            out = self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, **extra)
            base = base_output.take(out)
            pooled = pool_text_output(last_hidden(base), mask, self.pooling, self.last_token)
            states = getattr(base, "hidden_states", None)
            layers = None if not states else torch.stack(
                [pool_text_output(h, mask, self.pooling, self.last_token) for h in states], dim=1)
            probs = torch.softmax(out.logits.float(), dim=-1) if self.has_head else None
        return pooled, probs, layers


def extract_text_features(model_dir: Path, texts: list[str] | list[tuple[str, str]], *, max_length: int = 128,
                          batch_size: int = 32, device: str | None = None,
                          on_batch: Callable[[int, int], None] | None = None,
                          should_cancel: Callable[[], bool] | None = None,
                          max_tokens: int | None = None, bucket_by_length: bool = True,
                          pad_to_multiple_of: int | None = None, pooling: str = POOLING,
                          tokenize_ahead: bool | None = None, token_ids: TokenIdsCache | None = None) -> FeatureResult:
    """Pooled last hidden states of `texts` (or text pairs), one row per text, in order: `extract_features` for
    texts, whose docstring gives the options."""
    if not texts:
        raise ValueError("extract_features needs at least one text")
    began = time.perf_counter()
    device = pick_device(device)
    check_pooling(pooling)
    tokenizer, model, has_head = load_text_model(Path(model_dir), device)
    forward = _TextForward(model, has_head, device, pooling)
    load_seconds = time.perf_counter() - began
    max_length = length_limit(tokenizer, model, max_length)
    ahead = forward.on_cuda if tokenize_ahead is None else tokenize_ahead
    chunks = text_chunks(texts, batch_size, ahead, bucket_by_length)  # type: ignore[arg-type]
    multiple = pad_to_multiple_of or (8 if forward.on_cuda else 1)
    fingerprint = None if token_ids is None else tokenizer_fingerprint(Path(model_dir))
    shared = None if token_ids is None or fingerprint is None else (token_ids, f"{fingerprint}-{max_length}")

    def prepare(chunk: np.ndarray) -> list[TokenBatch]:
        return token_batches(tokenizer, texts, chunk, max_length=max_length,  # type: ignore[arg-type]
                             batch_size=batch_size, max_tokens=max_tokens, bucket_by_length=bucket_by_length,
                             multiple=multiple, pin_memory=forward.on_cuda, token_ids=shared)

    def full_batches(chunk: np.ndarray) -> int:
        return -(-len(chunk) // batch_size)

    # Batches per chunk are known once it is tokenised (max_tokens); until then a chunk counts as full batches.
    total = sum(map(full_batches, chunks))
    lengths = np.zeros(len(texts), dtype=np.int64)
    # The base model's last hidden state, also when the model is a classifier (its head gives source_probs).
    collected = FeatureRows(len(texts))
    padded, done = 0, 0
    with BackboneOutput(model, has_head) as base_output, \
            closing(prepared_in_order(prepare, chunks, int(ahead))) as prepared:  # a failure stops the thread
        for chunk, batches in zip(chunks, prepared):
            total += len(batches) - full_batches(chunk)
            for batch in batches:
                if should_cancel is not None and should_cancel():
                    raise FeatureExtractionCancelled(f"cancelled after {done} of {total} batches")
                lengths[batch.rows] = batch.lengths
                padded += batch.input_ids.numel()
                collected.put(batch.rows, *forward(batch, base_output))
                done += 1
                if on_batch is not None:
                    on_batch(done, total)
    assert collected.features is not None
    return FeatureResult(features=collected.features, source_probs=collected.probs,
                         forward_seconds=forward.clock.seconds, total_seconds=time.perf_counter() - began,
                         tokens=int(lengths.sum()), padded_tokens=padded,
                         num_parameters=sum(p.numel() for p in model.parameters()),
                         flops_estimate=text_forward_flops(base_output.base, model.config, lengths),
                         device=device, load_seconds=load_seconds, layer_features=collected.layers)
