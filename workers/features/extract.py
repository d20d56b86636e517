"""`extract_features`, the entry point: texts and text pairs go to workers.features.text, encoded images to
workers.features.images."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from workers.features.images import extract_image_features
from workers.features.result import POOLING, FeatureResult
from workers.features.text import TokenIdsCache, extract_text_features


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
    threads slowed torch's by 6-51% beside it (benchmarks/RESULTS.md, tokenize_ahead). token_ids: a cache shared by
    the candidates of one job (the same `texts`), so a tokenizer met before is not run again.
    on_batch(done, total) after each batch (with max_tokens, total can grow once a chunk is tokenised);
    should_cancel() is checked before each batch and raises FeatureExtractionCancelled.
    If the folder is a *ForSequenceClassification model with id2label, source_probs holds its head's softmax.
    pooling "mean" (what rank jobs use) averages the last hidden states over the attention mask; "head" takes the
    token a Hugging Face sequence-classification head reads: the last real token of a decoder-only model
    (`is_decoder_only`), the first token otherwise.
    """
    if texts and isinstance(texts[0], (bytes, bytearray)):
        return extract_image_features(model_dir, texts, batch_size=batch_size, device=device,  # type: ignore[arg-type]
                                      on_batch=on_batch, should_cancel=should_cancel, pooling=pooling)
    return extract_text_features(model_dir, texts,  # type: ignore[arg-type]
                                 max_length=max_length, batch_size=batch_size, device=device, on_batch=on_batch,
                                 should_cancel=should_cancel, max_tokens=max_tokens,
                                 bucket_by_length=bucket_by_length, pad_to_multiple_of=pad_to_multiple_of,
                                 pooling=pooling, tokenize_ahead=tokenize_ahead, token_ids=token_ids)
