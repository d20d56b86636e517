"""The names both processes agree on: tasks, modalities, estimators and the tasks each applies to, tokenizer files.

Torch-free. The API validates requests against these; the workers' registries are built from them.
"""

from __future__ import annotations

from dataclasses import dataclass

TASKS = ("classification", "multilabel", "regression")
MODALITIES = ("text", "image")
POOLINGS = ("mean", "head")
# What a rank job reads when it names no `layers`, by the dataset's modality. On the model-selection suite
# (benchmarks/RESULTS.md, model_selection) the best single estimator read the last layer (LogME alone did better on
# the mean of all layers: ask for "all" with it); image models are read at their last layer only.
DEFAULT_LAYERS = {"text": "last", "image": "last"}
# What a rank job scores when it names no `metrics`: the first orders the ranking (ridge_loo: the best single
# estimator by mean weighted tau on the same suite); LogME is always among them, since its evidence is what users
# come for and what the verdict's labels-only baseline reads.
DEFAULT_METRICS = ("ridge_loo", "logme")
STRATEGIES = ("finetune", "btuning")
# What a rank job may do to the N x D features of its rows before the estimators read them (workers/ranking/
# softdecay.py, docs/estimators.md): nothing, or SoftDecay's flattening of their singular value spectrum.
FEATURE_TRANSFORMS = ("none", "softdecay")
# SoftDecay's alpha lies in (low, high]: 0 is the identity, -1 and below leave ln(1 + |alpha| s - alpha^2) unbounded.
SOFTDECAY_ALPHA_RANGE = (-1.0, 0.0)
# The official code's values (github.com/hanqi-qi/tokenUni): -0.6 post-processes pooled sentence embeddings
# (unsupervisedSTS pooling_utils.soft_expand), what a rank job transforms; -0.2 starts fine-tuning
# (run_glue_no_trainer --decay_alpha), what `tune.softdecay` applies to the last layer's token states.
SOFTDECAY_RANK_ALPHA = -0.6
SOFTDECAY_TUNE_ALPHA = -0.2

_ALL_TASKS = frozenset(TASKS)
_CLASSIFICATION = frozenset({"classification"})


@dataclass(frozen=True)
class EstimatorInfo:
    """What the contract says of one transferability estimator (its function lives in workers.ranking)."""

    name: str
    tasks: frozenset[str]
    needs_source_head: bool = False  # reads the model's own classification head (LEEP, NCE)

    def applies_to(self, task: str) -> bool:
        return task in self.tasks


ESTIMATORS: dict[str, EstimatorInfo] = {info.name: info for info in (
    EstimatorInfo("logme", _ALL_TASKS),
    # LogME with an intercept on the leading k principal directions, k by maximum evidence (the few-examples fix).
    EstimatorInfo("logme_projected", _ALL_TASKS),
    # Exact leave-one-out accuracy / micro-F1 / R^2 of a ridge probe: what the Gaussian evidence misses on hard data.
    EstimatorInfo("ridge_loo", _ALL_TASKS),
    EstimatorInfo("hscore", _CLASSIFICATION),
    EstimatorInfo("hscore_shrinkage", _CLASSIFICATION),
    EstimatorInfo("nleep", _CLASSIFICATION),
    EstimatorInfo("gbc", _CLASSIFICATION),
    EstimatorInfo("transrate", _CLASSIFICATION),
    EstimatorInfo("sfda", _CLASSIFICATION),
    EstimatorInfo("leep", _CLASSIFICATION, needs_source_head=True),
    EstimatorInfo("nce", _CLASSIFICATION, needs_source_head=True),
)}


def estimator_applies(name: str, task: str) -> bool:
    return name in ESTIMATORS and ESTIMATORS[name].applies_to(task)


# Files that decide how a folder's tokenizer maps text to ids (fast and slow formats, special-token settings).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")
# Any one of these lets AutoTokenizer.from_pretrained(folder) build a tokenizer without a hub (the others only
# adjust one).
TOKENIZER_ENTRY_FILES = tuple(name for name in TOKENIZER_FILES
                              if name not in ("special_tokens_map.json", "added_tokens.json", "merges.txt"))
# What AutoImageProcessor.from_pretrained(folder) reads.
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
