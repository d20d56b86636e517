"""Feature extraction: batched forward passes, mean pooling over the attention mask, and a feature cache.

Images (encoded files as bytes) go through the model folder's own image processor and are pooled over positions
(`extract_image_features`); the rest of this docstring is about texts.

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
import os
import shutil
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, closing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from service.contract import POOLINGS, TOKENIZER_FILES

POOLING = "mean"
# Part of every cache key: bump when what extract_features computes (or the entry layout) changes.
CACHE_FORMAT = 6  # 3: each text read once (workers.pipeline.distinct_examples); 4: encoder-decoders read through
# their encoder (BART gave decoder states), images brought to 8 bits with transparency over white (eight_bit);
# 5: classifier checkpoints of encoder-decoders and dual encoders read through their backbone (`backbone`);
# 6: images' "head" pooling is the input of the architecture's image classifier (`_load_image_model`)


class FeatureExtractionCancelled(Exception):
    """should_cancel() returned True between two batches."""


@dataclass
class FeatureResult:
    features: np.ndarray  # (N, D) float32, in the caller's text order
    source_probs: np.ndarray | None  # (N, Z) softmax of the model's own classification head, if it has one
    forward_seconds: float  # forward passes and pooling only (synchronised on GPU)
    total_seconds: float  # loading + tokenising + forward + copying back
    tokens: int  # real tokens (special tokens included, padding excluded)
    padded_tokens: int  # tokens fed to the model, padding included
    num_parameters: int  # all parameters of the loaded model
    flops_estimate: float = 0.0  # useful forward FLOPs: 2·(matmul weights)·tokens + attention's 4·d·Σ len² per layer
    device: str = "cpu"
    load_seconds: float = 0.0  # model and tokenizer loading, part of total_seconds

    @property
    def padding_waste(self) -> float:
        """Fraction of the tokens fed to the model that were padding."""
        return 1.0 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    @property
    def flops_per_second(self) -> float:
        """Achieved useful FLOP/s of the forward passes (padding counts as wasted time, not as work)."""
        return self.flops_estimate / self.forward_seconds if self.forward_seconds > 0 else 0.0


def is_decoder_only(config: Any) -> bool:
    """A causal language model (Llama, Gemma, GPT-2, ...), whose sequence-classification head reads the last token:
    a model type with a causal-LM class and no masked-LM one (BERT and MPNet have both)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    kind = getattr(config, "model_type", None)
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def pick_device(device: str | None = None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


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


def _matmul_parameters(model: Any) -> int:
    """Weights that multiply every token (Linear layers, Conv1D in GPT-2 style models); embeddings are lookups."""
    import torch

    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            total += module.weight.numel()
    return total


def _useful_flops(base: Any, config: Any, lengths: np.ndarray) -> float:
    """2 FLOPs per weight per real token, plus attention's scores and mixing (4·d_attn·n² per layer for a text of
    n tokens). Padding is excluded: it is work done, not work needed."""
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    head_dim = int(getattr(config, "head_dim", 0) or (hidden // heads if heads else 0))
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    squares = float((lengths.astype(np.float64) ** 2).sum())
    return 2.0 * _matmul_parameters(base) * float(lengths.sum()) + 4.0 * layers * heads * head_dim * squares


def _load(model_dir: Path, device: str) -> tuple[Any, Any, bool]:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:  # decoders: any id works, padded positions are masked out
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    has_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])) \
        and bool(getattr(config, "id2label", None))
    loader: Any = AutoModelForSequenceClassification if has_head else AutoModel
    architecture = (config.architectures or [""])[0]
    if not has_head and architecture.endswith("EncoderModel") and hasattr(transformers, architecture):
        # T5EncoderModel (sentence-T5, Flan-T5 encoders): AutoModel would build the whole T5Model around it
        loader = getattr(transformers, architecture)
    model = loader.from_pretrained(model_dir, dtype=torch.float32)
    if not has_head and getattr(config, "is_encoder_decoder", False):
        # T5, BART, mT5: the encoder's states are the text's features (the decoder would need a target sequence,
        # and BART's own forward feeds it the shifted input, giving decoder states of the input instead).
        model = model.get_encoder()
    if has_head and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # decoder heads read the last non-pad token
    model.eval().to(device)
    return tokenizer, model, has_head


_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "mpnet", "data2vec-text", "longformer"}


def takes_token_types(config: Any) -> bool:
    """Whether the model has token type embeddings for a pair's second text (BERT, ALBERT, ELECTRA: 2). A tokenizer
    can declare token type ids that its model cannot take: RoBERTa-like configs hold one type, and the second
    text's type 1 would index past it; DistilBERT and decoders have none."""
    return int(getattr(config, "type_vocab_size", 0) or 0) >= 2


def length_limit(tokenizer: Any, model: Any, max_length: int) -> int:
    """max_length capped by what the model reads: the tokenizer's model_max_length and the position embeddings
    (RoBERTa-like models start their positions after the padding index)."""
    limit = max_length
    if 0 < (tokenizer.model_max_length or 0) < 1_000_000:
        limit = min(limit, int(tokenizer.model_max_length))
    positions = getattr(model.config, "max_position_embeddings", None)
    if getattr(model.config, "model_type", "") in _OFFSET_POSITIONS and isinstance(positions, int):
        positions -= 2  # positions start after the padding index
    if isinstance(positions, int) and positions > 0:
        limit = min(limit, positions)
    return limit


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


def backbone(model: Any) -> Any:
    """The module of a classifier whose output its head reads and whose states are the model's features, as they
    are for the same weights without the head: the base model (`base_model_prefix`); the encoder of an
    encoder-decoder (T5ForSequenceClassification's T5Model would report its decoder's states); the vision tower of
    a dual encoder's image classifier (CLIPForImageClassification has no `clip` attribute)."""
    import torch

    base = getattr(model, model.base_model_prefix, None)
    if not isinstance(base, torch.nn.Module) or base is model:
        return vision_tower(model) if hasattr(model.config, "vision_config") else model
    if getattr(base.config, "is_encoder_decoder", False) and hasattr(base, "get_encoder"):
        return base.get_encoder()
    return base


class _BaseOutput:
    """The backbone's own output when the model is a classifier (its head gives source_probs): a forward hook on
    the backbone (see `backbone`), removed on exit. Without a head the model is the backbone and nothing is
    hooked."""

    def __init__(self, model: Any, has_head: bool) -> None:
        self.base = backbone(model) if has_head else model
        self.has_head = has_head
        self.output: Any = None
        self._hook: Any = None

    def __enter__(self) -> "_BaseOutput":
        if self.has_head:
            self._hook = self.base.register_forward_hook(self._keep)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._hook is not None:
            self._hook.remove()

    def _keep(self, _module: Any, _args: Any, output: Any) -> None:
        self.output = output

    def take(self, out: Any) -> Any:
        """The backbone output of the forward that returned `out`."""
        if not self.has_head:
            return out
        output, self.output = self.output, None
        return output


def _last_hidden(output: Any) -> Any:
    return output[0] if isinstance(output, tuple) else output.last_hidden_state


class _Rows:
    """Pooled features (and source-head probabilities) written batch by batch into arrays in the caller's order."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.features: np.ndarray | None = None
        self.probs: np.ndarray | None = None

    def put(self, rows: Any, pooled: Any, probs: Any | None) -> None:
        pooled_np = pooled.cpu().numpy()
        if self.features is None:
            self.features = np.empty((self.count, pooled_np.shape[1]), dtype=np.float32)
        self.features[rows] = pooled_np
        if probs is not None:
            probs_np = probs.cpu().numpy()
            if self.probs is None:
                self.probs = np.empty((self.count, probs_np.shape[1]), dtype=np.float32)
            self.probs[rows] = probs_np


def extract_features(model_dir: Path, texts: list[str] | list[tuple[str, str]] | list[bytes], *,
                     max_length: int = 128,
                     batch_size: int = 32, device: str | None = None,
                     on_batch: Callable[[int, int], None] | None = None,
                     should_cancel: Callable[[], bool] | None = None,
                     max_tokens: int | None = None, bucket_by_length: bool = True,
                     pad_to_multiple_of: int | None = None, pooling: str = POOLING,
                     tokenize_ahead: bool | None = None, token_ids: TokenIdsCache | None = None) -> FeatureResult:
    """Mean-pooled last hidden states of `texts` (one row per text, in order) from the model in `model_dir`.
    A text may be a pair (tuple): the two are read as the tokenizer's pair (`encode`, `pair_inputs`).

    Encoded image files (bytes) instead of texts go to `extract_image_features` (the length options do not apply).

    max_length truncates each text (capped by what the model accepts); batches hold up to batch_size texts of
    similar length and, with max_tokens, at most that many padded tokens (bucket_by_length=False keeps the texts'
    own order instead: only for measuring what bucketing saves). Batch widths are rounded up to pad_to_multiple_of
    (default 8 on CUDA: few distinct shapes, so kernels and attention plans are reused; 1 on CPU).
    tokenize_ahead: whether one thread tokenises chunks ahead of the model (`text_chunks`; False: every text
    tokenised first, one sort; default: on CUDA only). One thread, because a fast tokenizer already spreads a batch
    over the cores, and one tokenizer object is not safe to share between threads (its truncation settings are set
    on each call). Not on the CPU: there tokenising is ~1-2% of a real model's forward time, and the tokenizer's
    threads slowed torch's by 6-51% beside it (benchmarks/results/tokenize_ahead.md). token_ids: a cache shared by
    the candidates of one job (the same `texts`), so a tokenizer met before is not run again.
    on_batch(done, total) after each batch (with max_tokens, total can grow once a chunk is tokenised);
    should_cancel() is checked before each batch and raises FeatureExtractionCancelled.
    If the folder is a *ForSequenceClassification model with id2label, source_probs holds its head's softmax.
    pooling "mean" (what rank jobs use) averages the last hidden states over the attention mask; "head" takes the
    token a Hugging Face sequence-classification head reads: the last real token of a decoder-only model
    (`is_decoder_only`), the first token otherwise.
    """
    import torch

    if not texts:
        raise ValueError("extract_features needs at least one text")
    if isinstance(texts[0], (bytes, bytearray)):
        return extract_image_features(model_dir, texts, batch_size=batch_size, device=device,  # type: ignore[arg-type]
                                      on_batch=on_batch, should_cancel=should_cancel, pooling=pooling)
    began = time.perf_counter()
    device = pick_device(device)
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    tokenizer, model, has_head = _load(Path(model_dir), device)
    last_token = pooling == "head" and is_decoder_only(model.config)
    token_types = takes_token_types(model.config)
    load_seconds = time.perf_counter() - began
    max_length = length_limit(tokenizer, model, max_length)
    on_cuda = device.startswith("cuda")
    ahead = on_cuda if tokenize_ahead is None else tokenize_ahead
    chunks = text_chunks(texts, batch_size, ahead, bucket_by_length)  # type: ignore[arg-type]
    multiple = pad_to_multiple_of or (8 if on_cuda else 1)
    amp_dtype = torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float16

    fingerprint = None if token_ids is None else tokenizer_fingerprint(Path(model_dir))
    shared = None if token_ids is None or fingerprint is None else (token_ids, f"{fingerprint}-{max_length}")

    def prepare(chunk: np.ndarray) -> list[TokenBatch]:
        return token_batches(tokenizer, texts, chunk, max_length=max_length,  # type: ignore[arg-type]
                             batch_size=batch_size, max_tokens=max_tokens, bucket_by_length=bucket_by_length,
                             multiple=multiple, pin_memory=on_cuda, token_ids=shared)

    def full_batches(chunk: np.ndarray) -> int:
        return -(-len(chunk) // batch_size)

    # Batches per chunk are known once it is tokenised (max_tokens); until then a chunk counts as full batches.
    total = sum(map(full_batches, chunks))
    lengths = np.zeros(len(texts), dtype=np.int64)
    # The base model's last hidden state, also when the model is a classifier (its head gives source_probs).
    collected = _Rows(len(texts))
    forward_seconds, padded, done = 0.0, 0, 0
    with _BaseOutput(model, has_head) as backbone, \
            closing(prepared_in_order(prepare, chunks, int(ahead))) as prepared:  # a failure stops the thread
        for chunk, batches in zip(chunks, prepared):
            total += len(batches) - full_batches(chunk)
            for batch in batches:
                if should_cancel is not None and should_cancel():
                    raise FeatureExtractionCancelled(f"cancelled after {done} of {total} batches")
                lengths[batch.rows] = batch.lengths
                padded += batch.input_ids.numel()
                input_ids = batch.input_ids.to(device, non_blocking=True)
                mask = batch.attention_mask.to(device, non_blocking=True)
                extra = {} if batch.token_type_ids is None or not token_types else {
                    "token_type_ids": batch.token_type_ids.to(device, non_blocking=True)}
                if on_cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                with torch.inference_mode(), torch.autocast("cuda", dtype=amp_dtype, enabled=on_cuda):
                    out = model(input_ids=input_ids, attention_mask=mask, **extra)
                    hidden = _last_hidden(backbone.take(out))
                    if pooling == "mean":
                        weights = mask.unsqueeze(-1).to(torch.float32)
                        pooled = (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)
                    else:  # batches are right-padded: the last real token sits at length - 1
                        at = mask.sum(1) - 1 if last_token else torch.zeros_like(mask[:, 0])
                        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), at].float()
                    batch_probs = torch.softmax(out.logits.float(), dim=-1) if has_head else None
                if on_cuda:
                    torch.cuda.synchronize()
                forward_seconds += time.perf_counter() - start
                collected.put(batch.rows, pooled, batch_probs)
                done += 1
                if on_batch is not None:
                    on_batch(done, total)
    assert collected.features is not None

    flops = _useful_flops(backbone.base, model.config, lengths)
    return FeatureResult(features=collected.features, source_probs=collected.probs, forward_seconds=forward_seconds,
                         total_seconds=time.perf_counter() - began, tokens=int(lengths.sum()),
                         padded_tokens=padded,
                         num_parameters=sum(p.numel() for p in model.parameters()), flops_estimate=flops,
                         device=device, load_seconds=load_seconds)


def _load_image_model(model_dir: Path, device: str, pooling: str = POOLING) -> tuple[Any, Any, bool, Any]:
    """(processor, model, has_head, head_layer). has_head: the folder is an image classifier with its labels (its
    softmax is a source head for LEEP/NCE). With pooling "head" the model is always an image classifier (a new head
    when the folder has none: only its input is used) and head_layer is its last linear layer, whose input is the
    feature; None where the architecture has no image-classification class."""
    import torch
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

    config = AutoConfig.from_pretrained(model_dir)
    # PIL-based processing unless torchvision is installed (it is not beside this torch build).
    processor = AutoImageProcessor.from_pretrained(model_dir)
    has_head = any(a.endswith("ForImageClassification") for a in (config.architectures or [])) \
        and bool(getattr(config, "id2label", None))
    model = None
    if has_head:
        model = AutoModelForImageClassification.from_pretrained(model_dir, dtype=torch.float32)
    elif pooling == "head":
        try:
            model = image_classifier(model_dir, {"num_labels": 2, "dtype": torch.float32})
        except ValueError:  # no image-classification class for this architecture: pool its backbone instead
            pass
    head_layer = classifier_layer(model, model.config.num_labels) if model is not None and pooling == "head" else None
    if model is None:
        model = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
        if hasattr(config, "vision_config"):
            model = vision_tower(model)
    model.eval().to(device)
    return processor, model, has_head, head_layer


def image_classifier(model_dir: Path, head: dict[str, Any]) -> Any:
    """AutoModelForImageClassification of the folder, with `head` (num_labels, id2label, ...). A dual encoder's vision
    tower saved alone (CLIPVisionModel, SiglipVisionModel: model_type "clip_vision_model", ...) has no image
    classifier of its own: it becomes the parent's (CLIPForImageClassification), whose vision_model.* weights are
    the tower's."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    config = AutoConfig.from_pretrained(model_dir)
    kind = getattr(config, "model_type", "") or ""
    parent = kind.removesuffix("_vision_model")
    if parent == kind or parent not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        return AutoModelForImageClassification.from_pretrained(model_dir, **head)
    labels = {k: head[k] for k in ("num_labels", "problem_type", "id2label", "label2id") if k in head}
    classifier = AutoModelForImageClassification.from_config(
        AutoConfig.for_model(parent, vision_config=config.to_dict(), **labels)).to(torch.float32)
    # the tower's weights into the classifier's tower, module to module: the files' key prefixes differ between
    # towers (CLIPVisionModel writes vision_model.*, SiglipVisionModel writes none)
    tower = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    source = getattr(tower, "vision_model", tower)
    missing, _ = vision_tower(classifier).load_state_dict(source.state_dict(), strict=False)
    if missing:
        raise ValueError(f"{model_dir}: the {kind} weights do not fill {parent}'s image classifier "
                         f"(missing {missing[:3]})")
    return classifier


def classifier_layer(model: Any, num_outputs: int) -> Any:
    """The head's last nn.Linear with num_outputs outputs, outside the backbone: the layer producing the logits of
    every Hugging Face *ForSequenceClassification / *ForImageClassification head (its input is what the head reads)."""
    import torch

    base = backbone(model)
    inside = {id(m) for m in base.modules()} if base is not model else set()
    found = None
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module) not in inside and module.out_features == num_outputs:
            found = module
    return found


def vision_tower(model: Any) -> Any:
    """The image encoder of a model that has more than one (CLIP, SigLIP, ALIGN: a text and a vision tower)."""
    for name in ("vision_model", "vision_tower", "visual"):
        tower = getattr(model, name, None)
        if tower is not None:
            return tower
    raise ValueError(f"{type(model).__name__} has a vision_config but no vision tower this service knows "
                     "(vision_model, vision_tower or visual)")


def threads_ahead(on_cuda: bool) -> int:
    """Threads decoding and resizing image batches ahead of the model (0: inline). Beside a GPU up to four, where
    decoding would otherwise bound the job; on the CPU one only when torch leaves a core free: when torch's threads
    take every core, a decoding thread slowed the forward passes by 5-14% (benchmarks/results/image_decode.md).
    Texts are tokenised ahead in one thread at most, and by default only beside a GPU (see extract_features)."""
    import torch

    cores = os.cpu_count() or 1
    if on_cuda:
        return max(1, min(4, cores - 1))
    return 1 if torch.get_num_threads() < cores else 0


def prepared_in_order(prepare: Callable[[Any], Any], items: list[Any], ahead: int) -> Iterator[Any]:
    """prepare(item) for each item, in order, computed in `ahead` threads up to `ahead` items before they are
    consumed (Pillow's decoders and resampling and numpy release the GIL); ahead=0 prepares each item when it is
    consumed. Closing the generator cancels what has not started; an exception in prepare is raised where its item
    is consumed."""
    if ahead <= 0:
        yield from (prepare(item) for item in items)
        return
    with ThreadPoolExecutor(max_workers=ahead) as pool:
        pending: deque[Future[Any]] = deque(pool.submit(prepare, item) for item in items[:ahead])
        try:
            for index in range(len(items)):
                result = pending.popleft().result()
                if index + ahead < len(items):
                    pending.append(pool.submit(prepare, items[index + ahead]))
                yield result
        finally:
            for future in pending:
                future.cancel()


def decode_images(images: list[bytes], mode: str = "RGB") -> list[Any]:
    """PIL images from encoded files, turned upright by their EXIF orientation (a phone's portrait photo is stored
    sideways with a tag saying so), brought to 8 bits per channel (`eight_bit`) and converted to `mode` (grayscale
    and palette images become RGB)."""
    import io

    from PIL import Image, ImageOps

    decoded = []
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            upright = ImageOps.exif_transpose(image)  # loads the pixels: the file can close
            decoded.append(eight_bit(upright).convert(mode))
    return decoded


def eight_bit(image: Any) -> Any:
    """An image whose pixels a pretrained model's processor reads as a picture: 8 bits per channel, no alpha.

    PIL's convert("RGB") clips 16-bit and 32-bit grayscale (microscopy, medical and satellite PNG/TIFF) to 255, so
    a 16-bit image came out almost white. Here "I;16" images, and "I" images within 0..65535, are scaled by the full
    16-bit range (value / 257, as torchvision's convert_image_dtype does: relative brightness between images is
    kept); float images within 0..1 by 255; other integer or float images are stretched from their own minimum to
    their maximum. Transparent pixels (RGBA, LA, palette transparency) are laid over white, as a viewer shows them;
    convert("RGB") would keep whatever colour hides under alpha 0, often black."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535):
            scaled = values / 257.0
        elif image.mode == "F" and low >= 0 and high <= 1:
            scaled = values * 255.0
        else:
            scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image


def pool_image_output(output: Any, pooling: str) -> Any:
    """One vector per image from a vision backbone's output.

    Feature maps (B, C, H, W), as CNNs return: "mean" averages over the positions; "head" takes pooler_output (what
    their image-classification heads read: the global average, after ConvNeXt's layer norm) when there is one.
    Token sequences (B, T, D), as ViTs return: "mean" averages over the tokens; "head" takes the first ([CLS]) token,
    which ViTForImageClassification reads (its pooler_output is an untrained dense + tanh in most checkpoints).
    extract_image_features uses "head" here only for architectures without an image-classification class; the
    others give the input of their classifier's last linear layer (see _load_image_model)."""
    hidden = _last_hidden(output)
    if hidden.ndim == 4:
        pooled = getattr(output, "pooler_output", None) if pooling == "head" else None
        if pooled is None:
            return hidden.float().mean(dim=(2, 3))
        return pooled.float().flatten(1)
    if hidden.ndim == 3:
        return hidden[:, 0].float() if pooling == "head" else hidden.float().mean(dim=1)
    raise ValueError(f"cannot pool a last hidden state of shape {tuple(hidden.shape)}")


def extract_image_features(model_dir: Path, images: list[bytes], *, batch_size: int = 32, device: str | None = None,
                           on_batch: Callable[[int, int], None] | None = None,
                           should_cancel: Callable[[], bool] | None = None,
                           pooling: str = POOLING) -> FeatureResult:
    """Pooled last hidden states (see pool_image_output) of encoded image files, in order, from the vision model in
    `model_dir`, each image resized and normalised by the folder's own image processor. If the folder is an
    *ForImageClassification model with id2label, source_probs holds its head's softmax. Token counts are image
    counts (nothing is padded); flops_estimate is the forward FLOPs of one image, counted by torch's
    FlopCounterMode, times the number of images. float32 on CPU, bf16 autocast on CUDA."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if not images:
        raise ValueError("extract_image_features needs at least one image")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    began = time.perf_counter()
    device = pick_device(device)
    processor, model, has_head, head_layer = _load_image_model(Path(model_dir), device, pooling)
    load_seconds = time.perf_counter() - began
    mode = "L" if getattr(model.config, "num_channels", 3) == 1 else "RGB"
    on_cuda = device.startswith("cuda")
    amp_dtype = torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float16

    def pixels(rows: list[bytes]) -> Any:
        batch = processor(images=decode_images(rows, mode), return_tensors="pt")["pixel_values"]
        return batch.to(device, non_blocking=True)

    collected = _Rows(len(images))
    forward_seconds = 0.0
    batches = [list(range(i, min(i + batch_size, len(images)))) for i in range(0, len(images), batch_size)]
    head_inputs: list[Any] = []
    with ExitStack() as stack:
        backbone = stack.enter_context(_BaseOutput(model, has_head))
        if head_layer is not None:  # "head": the input of the classifier's last linear layer
            hook = head_layer.register_forward_hook(lambda _m, args, _out: head_inputs.append(args[0]))
            stack.callback(hook.remove)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            backbone.take(model(pixel_values=pixels([images[0]])))
        head_inputs.clear()
        per_image_flops = float(counter.get_total_flops())
        # closing(): a cancel or a failing forward stops the decoding threads at once, not when collected
        prepared = stack.enter_context(closing(prepared_in_order(lambda rows: pixels([images[i] for i in rows]),
                                                                 batches, ahead=threads_ahead(on_cuda))))
        for done, (rows, pixel_values) in enumerate(zip(batches, prepared), start=1):
            if should_cancel is not None and should_cancel():
                raise FeatureExtractionCancelled(f"cancelled after {done - 1} of {len(batches)} batches")
            if on_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.inference_mode(), torch.autocast("cuda", dtype=amp_dtype, enabled=on_cuda):
                out = model(pixel_values=pixel_values)
                base_output = backbone.take(out)
                if head_layer is not None:
                    pooled = head_inputs.pop().float().flatten(1)
                    head_inputs.clear()
                else:
                    pooled = pool_image_output(base_output, pooling)
                batch_probs = torch.softmax(out.logits.float(), dim=-1) if has_head else None
            if on_cuda:
                torch.cuda.synchronize()
            forward_seconds += time.perf_counter() - start
            collected.put(rows, pooled, batch_probs)
            if on_batch is not None:
                on_batch(done, len(batches))
    assert collected.features is not None
    return FeatureResult(features=collected.features, source_probs=collected.probs, forward_seconds=forward_seconds,
                         total_seconds=time.perf_counter() - began, tokens=len(images), padded_tokens=len(images),
                         num_parameters=sum(p.numel() for p in model.parameters()),
                         flops_estimate=per_image_flops * len(images), device=device, load_seconds=load_seconds)


_META_FIELDS = [f.name for f in fields(FeatureResult) if f.name not in ("features", "source_probs")]


class FeatureCache:
    """Features on disk, keyed by what determines them. An entry is a folder (features.npy, source_probs.npy when
    the model has a head, meta.json) written under a temporary name and renamed into place when complete, so a crash
    leaves no half-written entry under a real key; concurrent writers of the same key both leave a whole entry."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @staticmethod
    def key(dataset_sha256: str, model_id: str, revision: str, pooling: str = POOLING, max_length: int = 128) -> str:
        """Deterministic key: dataset content (plus any sample tag), model and its pinned revision, pooling,
        max length, and this module's CACHE_FORMAT."""
        parts = json.dumps([CACHE_FORMAT, dataset_sha256, model_id, revision, pooling, int(max_length)])
        return hashlib.sha256(parts.encode()).hexdigest()[:32]

    def load(self, key: str) -> FeatureResult | None:
        """The stored result, or None when there is no whole entry for this key."""
        folder = self.root / key
        try:
            meta = json.loads((folder / "meta.json").read_text())
            features = np.load(folder / "features.npy")
            probs_path = folder / "source_probs.npy"
            probs = np.load(probs_path) if probs_path.is_file() else None
        except (OSError, ValueError):
            return None
        known = {k: meta[k] for k in _META_FIELDS if k in meta}
        return FeatureResult(features=features, source_probs=probs, **known)

    def save(self, key: str, result: FeatureResult) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.{uuid.uuid4().hex}.tmp"
        tmp.mkdir()
        try:
            np.save(tmp / "features.npy", np.ascontiguousarray(result.features, dtype=np.float32))
            if result.source_probs is not None:
                np.save(tmp / "source_probs.npy", np.ascontiguousarray(result.source_probs, dtype=np.float32))
            meta = {k: getattr(result, k) for k in _META_FIELDS}
            (tmp / "meta.json").write_text(json.dumps(meta))
            try:
                os.replace(tmp, self.root / key)
            except OSError:  # another worker finished the same entry first: theirs is as good
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def cached_extract(cache: FeatureCache, key: str, model_dir: Path, texts: list[str],
                   **kwargs: Any) -> tuple[FeatureResult, bool]:
    """cache.load(key), else extract_features(model_dir, texts, **kwargs) saved under key. Returns (result, hit)."""
    cached = cache.load(key)
    if cached is not None:
        return cached, True
    result = extract_features(model_dir, texts, **kwargs)
    cache.save(key, result)
    return result, False
