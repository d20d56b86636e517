"""Feature extraction: batched forward passes of a model folder over texts, text pairs or images, pooled into one
vector per item, and a cache of the results on disk.

    extract.py   extract_features, the entry point (texts and pairs to text.py, encoded images to images.py)
    text.py      tokenising, pairs, batching by length, TokenIdsCache, tokenising ahead; the text forward passes
    images.py    decoding (EXIF, 8 bits, transparency), the image processor, the image forward passes
    adapters.py  loading a model folder; which module gives the features (backbone, vision tower), what a head
                 reads, the length a model takes; pooling hidden states
    flops.py     forward FLOPs (counted from the weights for texts, by torch for images)
    runtime.py   the device, autocast dtype, the forward clock, work prepared ahead in threads
    result.py    FeatureResult, FeatureExtractionCancelled, the rows filled batch by batch
    cache.py     FeatureCache and CACHE_FORMAT

torch is imported inside the functions that need it, never at import: the API process imports no torch.
"""

from workers.features.adapters import (
    backbone,
    classifier_layer,
    image_classifier,
    is_decoder_only,
    length_limit,
    load_image_model,
    load_text_model,
    pool_image_output,
    pool_text_output,
    takes_token_types,
    vision_tower,
)
from workers.features.cache import CACHE_FORMAT, FeatureCache
from workers.features.extract import extract_features
from workers.features.flops import text_forward_flops
from workers.features.images import decode_images, eight_bit, extract_image_features
from workers.features.result import POOLING, FeatureExtractionCancelled, FeatureResult
from workers.features.runtime import pick_device, prepared_in_order, threads_ahead
from workers.features.text import (
    TokenBatch,
    TokenIdsCache,
    encode,
    extract_text_features,
    length_batches,
    padded_tokens,
    pair_inputs,
    text_chunks,
    token_batches,
    tokenizer_fingerprint,
)

__all__ = [
    "CACHE_FORMAT",
    "POOLING",
    "FeatureCache",
    "FeatureExtractionCancelled",
    "FeatureResult",
    "TokenBatch",
    "TokenIdsCache",
    "backbone",
    "classifier_layer",
    "decode_images",
    "eight_bit",
    "encode",
    "extract_features",
    "extract_image_features",
    "extract_text_features",
    "image_classifier",
    "is_decoder_only",
    "length_batches",
    "length_limit",
    "load_image_model",
    "load_text_model",
    "pair_inputs",
    "padded_tokens",
    "pick_device",
    "pool_image_output",
    "pool_text_output",
    "prepared_in_order",
    "takes_token_types",
    "text_chunks",
    "text_forward_flops",
    "threads_ahead",
    "token_batches",
    "tokenizer_fingerprint",
    "vision_tower",
]
