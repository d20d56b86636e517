"""The contract both processes share: names, job statuses and their transitions, the tuning spec. Torch-free.

The API validates requests against it; the workers build their registries and settings from it. Nothing here is
written twice elsewhere.
"""

from service.contract.names import (
    DEFAULT_LAYERS,
    DEFAULT_METRICS,
    ESTIMATORS,
    FEATURE_TRANSFORMS,
    IMAGE_PROCESSOR_FILE,
    MODALITIES,
    POOLINGS,
    SOFTDECAY_ALPHA_RANGE,
    SOFTDECAY_RANK_ALPHA,
    SOFTDECAY_TUNE_ALPHA,
    STRATEGIES,
    TASKS,
    TOKENIZER_ENTRY_FILES,
    TOKENIZER_FILES,
    EstimatorInfo,
    estimator_applies,
)
from service.contract.status import (
    CANDIDATE_TRANSITIONS,
    TERMINAL,
    TRANSITIONS,
    CandidateStatus,
    JobPhase,
    JobStatus,
)
from service.contract.tuning import (
    AUGMENTATIONS,
    HEADS,
    LIMITS,
    MAX_TRADEOFF_TRIALS,
    PEFT_REFUSED,
    REGULARIZER_PARAMS,
    Param,
    PeftSpec,
    RegularizerSpec,
    SngpSpec,
    SoftDecaySpec,
    TuneConfig,
    TuneSpec,
    check_tune_for_dataset,
    describe_regularizers,
    resolve_augment,
    resolve_peft,
    resolve_regularizer,
    resolve_sngp,
    resolve_softdecay,
)

__all__ = [
    "AUGMENTATIONS", "CANDIDATE_TRANSITIONS", "DEFAULT_LAYERS", "DEFAULT_METRICS", "ESTIMATORS", "FEATURE_TRANSFORMS",
    "HEADS",
    "IMAGE_PROCESSOR_FILE", "LIMITS", "CandidateStatus",
    "MAX_TRADEOFF_TRIALS", "MODALITIES", "PEFT_REFUSED", "POOLINGS", "REGULARIZER_PARAMS", "STRATEGIES", "TASKS",
    "TERMINAL", "TOKENIZER_ENTRY_FILES", "TOKENIZER_FILES", "TRANSITIONS", "EstimatorInfo", "JobPhase", "JobStatus",
    "Param", "PeftSpec", "RegularizerSpec", "TuneConfig", "TuneSpec", "check_tune_for_dataset",
    "describe_regularizers", "estimator_applies", "resolve_augment", "resolve_peft", "resolve_regularizer",
    "resolve_sngp", "resolve_softdecay", "SngpSpec", "SoftDecaySpec", "SOFTDECAY_ALPHA_RANGE", "SOFTDECAY_RANK_ALPHA",
    "SOFTDECAY_TUNE_ALPHA",
]
