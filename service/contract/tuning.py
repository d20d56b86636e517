"""Tuning: the request's `tune` block (TuneSpec), every regularizer's parameters with their defaults, and the
worker's settings of one run (TuneConfig, built from a TuneSpec). Plain data, no torch.

The API validates a job's `tune` block with TuneSpec and `resolve_regularizer` (ValueError naming the field) and
lists the regularizers with `describe_regularizers`; the worker builds its TuneConfig with `TuneConfig.from_spec`.
Bounds that both check are written once, in LIMITS.

Defaults are the published ones where a paper or its official code gives one (source in each doc string); where the
published value belongs to another architecture or data scale, the doc says what was chosen instead and why.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, ValidationInfo, field_validator

from service.contract.names import SOFTDECAY_ALPHA_RANGE, SOFTDECAY_TUNE_ALPHA, STRATEGIES
from service.contract.text import ID_LENGTH, RequestModel

# (low, high) of the settings a request and a run both take; a request cannot ask for what a run refuses.
LIMITS: dict[str, tuple[float, float]] = {
    "epochs": (1, 100),
    "batch_size": (1, 1024),
    "max_length": (8, 8192),
    "seed": (0, 2**31 - 1),
    "lr": (0.0, 1.0),  # lr > 0
}
# B-Tuning's tradeoff given as a list: each value costs one trial run
MAX_TRADEOFF_TRIALS = 8
# Text augmentations of the training rows (workers/tuning/augment.py): EDA's operations without synonyms
AUGMENTATIONS = ("swap", "delete", "insert", "eda")
AUGMENT_P_DEFAULT = 0.1  # EDA's recommended alpha for its operations
# The classifier's output layer: a new nn.Linear, or SNGP's Gaussian-process head (workers/tuning/sngp.py)
HEADS = ("linear", "sngp")
SNGP_TASKS = ("classification",)  # its Laplace covariance and mean-field logits are for a softmax over classes


@dataclass(frozen=True)
class Param:
    """One regularizer parameter: its default, what it means, and what values it accepts."""

    default: Any
    doc: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None  # inclusive bounds for numbers
    high: float | None = None

    def check(self, where: str, value: Any) -> Any:
        """Return `value` converted to the default's type, or raise ValueError naming `where`."""
        kind = type(self.default)
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{where}: expected true or false, got {value!r}")
        elif kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where}: expected a number, got {value!r}")
            if kind is int and float(value) != int(value):
                raise ValueError(f"{where}: expected an integer, got {value!r}")
            value = kind(value)
            if not math.isfinite(value):
                raise ValueError(f"{where}: must be finite, got {value!r}")
            if self.low is not None and value < self.low:
                raise ValueError(f"{where}: must be >= {self.low}, got {value}")
            if self.high is not None and value > self.high:
                raise ValueError(f"{where}: must be <= {self.high}, got {value}")
        elif kind is str and not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{where}: must be one of {list(self.choices)}, got {value!r}")
        return value


REGULARIZER_PARAMS: dict[str, dict[str, Param]] = {
    # Plain fine-tuning: the baseline.
    "none": {},
    # L2-SP (Li et al., ICML 2018; TLlib tllib/regularization: SPRegularization + L2Regularization, 0.01 each).
    "l2sp": {
        "alpha": Param(0.01, "weight of alpha/2 * ||w - w0||^2 over the pretrained backbone's parameters", low=0.0),
        "beta": Param(0.01, "weight of beta/2 * ||w||^2 over the newly initialised head's parameters", low=0.0),
    },
    # Mixout (Lee et al., ICLR 2020; bloodwass/mixout). Published runs use p in {0.7, 0.8, 0.9}.
    "mixout": {
        "p": Param(0.7, "probability of swapping a weight column back to its pretrained value w0 each forward "
                        "(the paper's range is 0.7-0.9; 0.7 is the mildest of those)", low=0.0, high=1.0),
        "disable_dropout": Param(True, "set the backbone's dropout to 0, as the reference HF example does "
                                       "(mixout replaces dropout there)"),
    },
    # SMART (Jiang et al., ACL 2020; namisan/mt-dnn perturbation.py and its train.py defaults).
    "smart": {
        "lam": Param(1.0, "lambda: weight of the symmetric-KL smoothness term (mt-dnn adv_alpha)", low=0.0),
        "noise": Param(1e-5, "std of the initial Gaussian perturbation of the input embeddings (adv_noise_var)",
                       low=0.0),
        "step": Param(1e-5, "size of the one ascent step on the perturbation (adv_step_size)", low=0.0),
        "norm": Param("inf", "how the ascent direction is normalised per token: 'inf' (max-abs, mt-dnn default) "
                             "or 'l2'", choices=("inf", "l2")),
    },
    # R3F (Aghajanyan et al., ICLR 2021; fairseq examples/rxf: r3f_lambda=1, eps=1e-5, noise_type uniform).
    "r3f": {
        "lam": Param(1.0, "lambda: weight of symKL(f(emb), f(emb + z))", low=0.0),
        "eps": Param(1e-5, "noise scale: z ~ U(-eps, eps) or N(0, eps^2)", low=0.0),
        "noise": Param("uniform", "noise distribution", choices=("uniform", "normal")),
    },
    # VAT (Miyato et al., TPAMI 2018; takerum/vat_tf: xi=1e-6, one power iteration).
    "vat": {
        "lam": Param(1.0, "lambda: weight of KL(p(x) || p(x + r_adv))", low=0.0),
        "xi": Param(1e-6, "L2 norm per token of the random probe of the power iteration (measured on "
                          "MiniLM-L6: in float32 the direction matches float64's small-xi limit, cosine 0.99; "
                          "from xi ~ 1e-5 on it drifts away from it)", low=0.0),
        "eps": Param(1.0, "L2 norm of r_adv over each example's (unpadded) input embeddings; 8 is for images "
                          "in the paper, word embeddings of a 128-token text have a norm near 10", low=0.0),
    },
    # SiFT (He et al., DeBERTa; microsoft/DeBERTa DeBERTa/sift/sift.py; vat_lambda 5 in its experiment scripts).
    "sift": {
        "lam": Param(5.0, "lambda: weight of the symmetric-KL term (DeBERTa scripts: vat_lambda 5)", low=0.0),
        "step": Param(1e-4, "ascent step in LayerNorm-normalised embedding units, max-abs normalised per token "
                            "(vat_learning_rate)", low=0.0),
        "init": Param(1e-2, "std of the initial perturbation, clipped to +-2*init (vat_init_perturbation)", low=0.0),
    },
    # LNSR (Hua et al., NAACL 2021). No official code; defaults chosen a priori, tune by validation.
    "lnsr": {
        "lam": Param(1.0, "total weight of the penalty, spread evenly over the penalised layers (lambda_j = "
                          "lam / number of layers after the injection point)", low=0.0),
        "sigma": Param(0.05, "std of the Gaussian noise added to the hidden states (LayerNorm'd states have unit "
                             "RMS, so this is about the 5% noise of the paper's figure 1)", low=0.0),
        "layer": Param(0, "index of the Transformer layer whose input receives the noise (0: the embedding "
                          "output); the outputs of this and every later layer are penalised", low=0),
    },
    # HyPe (Yuan et al., ACL 2023; Yuanhy1997/HyPe README: --hype_type uniform --hype_eps 1e-5 --dropout_rate 0).
    "hype": {
        "eps": Param(1e-5, "noise scale added to every Transformer layer's input in training", low=0.0),
        "noise": Param("uniform", "'uniform': eps * U(0, 1) as in the official code; 'normal': eps * N(0, 1)",
                       choices=("uniform", "normal")),
        "disable_dropout": Param(True, "turn dropout off, as the official script does"),
    },
    # Noisy feature mixup (Lim et al., ICLR 2022; erichson/NFM: alpha=1, add_noise_level=0.4, mult_noise_level=0.2).
    "nfm": {
        "alpha": Param(1.0, "mixing weight lambda ~ Beta(alpha, alpha)", low=0.0),
        "add_noise": Param(0.4, "additive noise level: x + add * Beta(2,5) * rms(x) * N(0,1); rms(x) keeps the "
                                "published level for unit-scale inputs", low=0.0),
        "mult_noise": Param(0.2, "multiplicative noise level: x * (1 + mult * Beta(2,5) * U(-1,1))", low=0.0),
        "manifold": Param(True, "mix at the input of a random Transformer layer (manifold mixup) instead of "
                                "always at the embedding output"),
    },
    # Regularized self-labeling (Li & Zhang, NeurIPS 2021; VirtuosoResearch/Regularized-Self-Labeling).
    "self_labeling": {
        "radius": Param(0.05, "distance bound of the first layers: ||W - W0||_F <= radius * growth^depth "
                              "(times ||W0||_F when relative); the repo's absolute radii are for ResNets", low=0.0),
        "growth": Param(1.2, "factor by which the bound grows per layer of depth (repo: scale_factor)", low=1.0),
        "relative": Param(True, "bounds are fractions of ||W0||_F (the repo's use_ratio mode)"),
        "head_radius": Param(10.0, "bound on ||W_head||_F of the new head's weight matrices (distance to 0, as "
                                   "in the repo)", low=0.0),
        "temperature": Param(2.0, "loss reweighting softmax(-loss / T) over the batch (repo README: 2.0), decayed "
                                  "to no less than half as in the repo", low=1e-6),
        "threshold": Param(0.9, "relabel when the model's top probability exceeds this and disagrees "
                                "(classification only)", low=0.0, high=1.0),
        "reweight_start": Param(1 / 6, "fraction of training after which reweighting starts (repo: epoch 5 of 30)",
                                low=0.0, high=1.0),
        "relabel_start": Param(1 / 3, "fraction of training after which relabeling starts (repo: epoch 10 of 30)",
                               low=0.0, high=1.0),
    },
    # Sharpness-aware minimisation (Foret et al., ICLR 2021: rho 0.05, the paper's default; Bahri et al., ACL 2022
    # fine-tune language models with rho in 0.02-0.15) and ASAM (Kwon et al., ICML 2021; SamsungLabs/ASAM:
    # eta 0.01, rho 0.5 on CIFAR-10, about 10x SAM's, because the scaled ball is smaller).
    "sam": {
        "rho": Param(0.05, "radius of the neighbourhood: the gradient is taken at w + e, ||e|| = rho (ASAM: "
                           "||e / (|w| + eta)|| = rho; its paper uses about 10x SAM's rho)", low=0.0),
        "adaptive": Param(False, "ASAM: scale the neighbourhood per weight by |w| + eta (biases unscaled)"),
        "eta": Param(0.01, "ASAM's offset in |w| + eta, which keeps weights at 0 perturbable", low=0.0),
    },
}


def regularizer_names() -> list[str]:
    return list(REGULARIZER_PARAMS)


def resolve_regularizer(name: str, params: dict[str, Any] | None = None,
                        where: str = "regularizer") -> dict[str, Any]:
    """Defaults overlaid with `params`, checked; ValueError names the bad field."""
    if name not in REGULARIZER_PARAMS:
        raise ValueError(f"{where}.name: unknown regularizer {name!r}; choose one of {regularizer_names()}")
    specs = REGULARIZER_PARAMS[name]
    params = dict(params or {})
    unknown = sorted(set(params) - set(specs))
    if unknown:
        raise ValueError(f"{where}.params.{unknown[0]}: unknown parameter for {name!r}; "
                         f"known: {sorted(specs) or 'none'}")
    out = {key: spec.default for key, spec in specs.items()}
    for key, value in params.items():
        out[key] = specs[key].check(f"{where}.params.{key}", value)
    return out


def describe_regularizers() -> dict[str, dict[str, dict[str, Any]]]:
    """JSON-ready {name: {param: {default, doc, choices?}}} for the API's documentation."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, specs in REGULARIZER_PARAMS.items():
        out[name] = {}
        for key, spec in specs.items():
            entry: dict[str, Any] = {"default": spec.default, "doc": spec.doc}
            if spec.choices is not None:
                entry["choices"] = list(spec.choices)
            out[name][key] = entry
    return out


def resolve_augment(value: Any, where: str = "augment") -> dict[str, Any] | None:
    """{"name", "p"} checked, p defaulted; None for no augmentation. ValueError names the bad field."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected an object {{\"name\": ..., \"p\": ...}} or null")
    unknown = sorted(set(value) - {"name", "p"})
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown field (expected name, p)")
    name = value.get("name")
    if name not in AUGMENTATIONS:
        raise ValueError(f"{where}.name: must be one of {list(AUGMENTATIONS)}, got {name!r}")
    p = Param(AUGMENT_P_DEFAULT, "", low=0.0, high=1.0).check(f"{where}.p", value.get("p", AUGMENT_P_DEFAULT))
    return {"name": name, "p": p}


# Regularizers that refer to the pretrained weights, with adapters (docs/tuning.md, "LoRA"): l2sp penalises the
# adapters' update ||s B A||^2 (the frozen base is w0 exactly), self_labeling bounds ||s B A||_F per layer;
# mixout, which mixes each fine-tuned weight back to its pretrained value, has no fine-tuned weight to mix.
PEFT_REFUSED = {
    "mixout": "mixout mixes fine-tuned weights back to their pretrained values, and with LoRA the pretrained "
              "weights are frozen; use peft.dropout, or full fine-tuning (peft null) with mixout",
}


def _peft_error(exc: Exception, where: str) -> ValueError:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        return ValueError(f"{where}{'.' + loc if loc else ''}: {first['msg']}")
    return ValueError(f"{where}: {exc}")


def resolve_peft(value: Any, regularizer: str = "none", where: str = "peft") -> dict[str, Any] | None:
    """The peft block with its defaults (PeftSpec), checked, and checked against the regularizer; None for full
    fine-tuning. ValueError names the bad field."""
    if value is None:
        return None
    try:
        spec = PeftSpec.model_validate(value)
    except Exception as exc:  # pydantic's ValidationError, re-raised naming the field
        raise _peft_error(exc, where) from None
    if regularizer in PEFT_REFUSED:
        raise ValueError(f"{where}: {spec.method} cannot be combined with regularizer {regularizer}: "
                         f"{PEFT_REFUSED[regularizer]}")
    return spec.model_dump()


def resolve_sngp(value: Any, head: str = "sngp", where: str = "sngp") -> dict[str, Any] | None:
    """The SNGP head's settings with their defaults (SngpSpec) for head "sngp", None for "linear"; ValueError
    naming the field (settings given for a linear head)."""
    if head not in HEADS:
        raise ValueError(f"head: must be one of {list(HEADS)}, got {head!r}")
    if head == "linear":
        if value is not None:
            raise ValueError(f"{where}: settings of the SNGP head apply with head \"sngp\"")
        return None
    try:
        spec = SngpSpec.model_validate(value or {})
    except Exception as exc:  # pydantic's ValidationError, re-raised naming the field
        raise _peft_error(exc, where) from None
    return spec.model_dump()


def resolve_softdecay(value: Any, where: str = "softdecay") -> dict[str, Any] | None:
    """SoftDecay of the last layer's token states ({"alpha"}, SoftDecaySpec's default filled in), None: off.
    ValueError names the bad field."""
    if value is None:
        return None
    try:
        spec = SoftDecaySpec.model_validate(value)
    except Exception as exc:  # pydantic's ValidationError, re-raised naming the field
        raise _peft_error(exc, where) from None
    return spec.model_dump()


def check_tune_for_dataset(tune: dict[str, Any], modality: str, where: str = "tune", task: str | None = None) -> None:
    """What a tune block cannot ask of a dataset of this modality (and task, when given); ValueError naming the
    field. The API calls it with the dataset's modality and task before queueing a job, the worker before
    training."""
    if tune.get("augment") is not None and modality != "text":
        raise ValueError(f"{where}.augment: text augmentation applies to text datasets; this dataset holds "
                         f"{modality}s")
    if tune.get("softdecay") is not None and modality != "text":
        raise ValueError(f"{where}.softdecay: SoftDecay transforms a text model's token states; this dataset holds "
                         f"{modality}s")
    if tune.get("head", "linear") == "sngp" and task is not None and task not in SNGP_TASKS:
        raise ValueError(f"{where}.head: sngp applies to single-label classification; this dataset is {task}")


@dataclass
class TuneConfig:
    """Settings of one tuning run. Every field has a default; `validate()` names the first bad field.

    strategy: "finetune" (task loss + the chosen regularizer) or "btuning" (task loss + tradeoff * B-Tuning term,
        plus the regularizer if one is chosen).
    regularizer, regularizer_params: a name from REGULARIZER_PARAMS and overrides of its defaults.
    epochs, lr, batch_size, max_length: the usual BERT fine-tuning values (Devlin et al.: 2e-5, 16-32, 3 epochs).
    seed: seeds the head's initialisation, the data order, dropout and every regularizer's noise.
    weight_decay: AdamW decoupled weight decay, not applied to biases and normalisation weights.
    warmup_ratio: linear warmup over this fraction of the steps, then linear decay to 0.
    max_grad_norm: gradient clipping (0 turns it off).
    tradeoff: B-Tuning's lambda (thuml/LogME b_tuning.py uses 100 on a mean over N x C; ours is a mean over
        examples of a squared norm over C, so the reference's 100 is 100/C here). Data-dependent: a tune job picks
        it by validation unless given (workers.tuning.selection); this loop takes the number.
    temperature: B-Tuning's T in the teacher weights softmax(LogME_k / T) (paper and reference: 0.1).
    save_every_steps: write the full training state for resuming every this many optimiser steps (0: never).
    eval_every_steps: also evaluate every this many steps (0: only at the end of each epoch).
    device: "cpu", "cuda", "cuda:1"...; None picks cuda when available.
    bf16: autocast the forward passes to bfloat16 on CUDA (master weights stay float32); ignored on CPU, and
        ignored for smart, r3f, vat and hype, whose 1e-5-scale noise bfloat16 cannot represent.
    augment: {"name", "p"} (resolve_augment): the training texts re-augmented every epoch; None: as given.
    peft: {"method": "lora", "r", "alpha", "dropout", "target_modules", "merge"} (resolve_peft): train LoRA
        adapters and the head only; None: full fine-tuning.
    head: "linear" (a new nn.Linear output layer) or "sngp" (workers/tuning/sngp.py; classification only).
    sngp: the SNGP head's settings (resolve_sngp: SngpSpec's defaults for head "sngp"); None for "linear".
    softdecay: {"alpha"} (resolve_softdecay): SoftDecay of each example's last-layer token states
        (workers/tuning/softdecay.py), in training and in the checkpoint; None: off.
    """

    strategy: str = "finetune"
    regularizer: str = "none"
    regularizer_params: dict[str, Any] = field(default_factory=dict)
    epochs: int = 3
    lr: float = 2e-5
    batch_size: int = 16
    max_length: int = 128
    seed: int = 0
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    tradeoff: float = 1.0
    temperature: float = 0.1
    save_every_steps: int = 50
    eval_every_steps: int = 0
    device: str | None = None
    bf16: bool = True
    augment: dict[str, Any] | None = None
    peft: dict[str, Any] | None = None
    head: str = "linear"
    sngp: dict[str, Any] | None = None
    softdecay: dict[str, Any] | None = None

    @classmethod
    def from_spec(cls, spec: dict[str, Any], tradeoff: float = 1.0, device: str | None = None) -> TuneConfig:
        """The run's settings for a job's `tune` block (TuneSpec.model_dump()); `tradeoff` is the value this run
        uses (a spec may ask for several, or "auto", to be chosen by trial runs)."""
        return cls(strategy=spec["strategy"], regularizer=spec["regularizer"]["name"],
                   regularizer_params=spec["regularizer"]["params"], epochs=spec["epochs"], lr=spec["lr"],
                   batch_size=spec["batch_size"], max_length=spec["max_length"], seed=spec["seed"],
                   tradeoff=tradeoff, temperature=spec["temperature"], device=device,
                   augment=spec.get("augment"), peft=spec.get("peft"), head=spec.get("head", "linear"),
                   sngp=spec.get("sngp"), softdecay=spec.get("softdecay")).validate()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TuneConfig:
        """Build from JSON-like data; unknown keys and bad values raise ValueError naming the field.

        Also accepts the API's nested form {"regularizer": {"name": ..., "params": {...}}}.
        """
        data = dict(data)
        reg = data.get("regularizer")
        if isinstance(reg, dict):
            extra = sorted(set(reg) - {"name", "params"})
            if extra:
                raise ValueError(f"regularizer.{extra[0]}: unknown field (expected name, params)")
            data["regularizer"] = reg.get("name", "none")
            if "regularizer_params" in data:
                raise ValueError("regularizer_params: give params inside regularizer or here, not both")
            data["regularizer_params"] = reg.get("params") or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown tuning setting")
        config = cls(**data)
        config.validate()
        return config

    def validate(self) -> TuneConfig:
        def number(name: str, low: float | None = None, high: float | None = None, integer: bool = False,
                   strict_low: bool = False) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite number, got {value!r}")
            if integer and int(value) != value:
                raise ValueError(f"{name}: expected an integer, got {value!r}")
            if low is not None and (value <= low if strict_low else value < low):
                raise ValueError(f"{name}: must be {'>' if strict_low else '>='} {low}, got {value}")
            if high is not None and value > high:
                raise ValueError(f"{name}: must be <= {high}, got {value}")
            setattr(self, name, int(value) if integer else float(value))

        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        if not isinstance(self.regularizer, str):
            raise ValueError(f"regularizer: expected a name, got {self.regularizer!r}")
        if not isinstance(self.regularizer_params, dict):
            raise ValueError("regularizer_params: expected an object")
        self.regularizer_params = {k: v for k, v in resolve_regularizer(
            self.regularizer, self.regularizer_params).items() if k in self.regularizer_params}
        for name in ("epochs", "batch_size", "max_length", "seed"):
            number(name, *LIMITS[name], integer=True)
        number("lr", *LIMITS["lr"], strict_low=True)
        number("weight_decay", 0.0, 10.0)
        number("warmup_ratio", 0.0, 1.0)
        number("max_grad_norm", 0.0)
        number("tradeoff", 0.0)
        number("temperature", 0.0, strict_low=True)
        number("save_every_steps", 0, integer=True)
        number("eval_every_steps", 0, integer=True)
        if self.device is not None and not isinstance(self.device, str):
            raise ValueError(f"device: expected a string such as 'cpu' or 'cuda', got {self.device!r}")
        if not isinstance(self.bf16, bool):
            raise ValueError(f"bf16: expected true or false, got {self.bf16!r}")
        self.augment = resolve_augment(self.augment)
        self.peft = resolve_peft(self.peft, self.regularizer)
        self.sngp = resolve_sngp(self.sngp, self.head)
        self.softdecay = resolve_softdecay(self.softdecay)
        return self

    def resolved_regularizer_params(self) -> dict[str, Any]:
        return resolve_regularizer(self.regularizer, self.regularizer_params)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["regularizer_params"] = self.resolved_regularizer_params()
        return data


class RegularizerSpec(RequestModel):
    name: Literal[tuple(REGULARIZER_PARAMS)] = "none"  # type: ignore[valid-type]
    params: dict[str, Any] = Field(default_factory=dict)


class AugmentSpec(RequestModel):
    name: Literal[AUGMENTATIONS]  # type: ignore[valid-type]
    p: float = Field(default=AUGMENT_P_DEFAULT, ge=0.0, le=1.0,
                     description="swap, insert: p x the row's tokens (at least 1); delete: each token's probability")


_MODULE_NAME = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.\-]{1,100}$")]


class PeftSpec(RequestModel):
    """LoRA (Hu et al. 2022) through peft; the defaults are peft's LoraConfig documentation example (r 8, alpha 16)
    and its common dropout 0.05."""

    method: Literal["lora"] = "lora"
    r: int = Field(default=8, ge=1, le=1024, description="rank of the update B A")
    alpha: float = Field(default=16.0, gt=0, le=1e4, description="scaling alpha / r of the update")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: Literal["auto", "all-linear"] | list[_MODULE_NAME] = Field(
        default="auto", description="\"auto\": the attention's query and value projections; \"all-linear\": "
        "every linear layer of the backbone; or module names (1 to 64)")
    merge: bool = Field(default=False, description="also write merged/: the weights with the update added, a "
                                                   "plain Hugging Face folder")

    @field_validator("target_modules")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if isinstance(value, list) and not 1 <= len(value) <= 64:
            raise ValueError("give 1 to 64 module names")
        return value


class SngpSpec(RequestModel):
    """SNGP's settings (Liu et al. 2020; edward2's RandomFeatureGaussianProcess and the paper's code): spectral
    bound 0.95, 1024 random features, ridge 1, mean-field factor pi/8. The lengthscale is the one setting whose
    reference value (1, on LayerNorm'd inputs) belongs to the paper's ResNets trained from scratch; on a pretrained
    model's D-dimensional features it would make every pair of rows look unrelated, so null means sqrt(D): a
    LayerNorm'd input has norm sqrt(D), and the kernel exp(-|z - z'|^2 / 2 l^2) is then exp(-(1 - corr(z, z')))."""

    norm_bound: float = Field(default=0.95, gt=0, le=10, description="spectral-norm bound of the head's hidden "
                              "layers (W rescaled only when its largest singular value exceeds it)")
    random_features: int = Field(default=1024, ge=16, le=8192, description="random Fourier features of the GP")
    lengthscale: float | None = Field(default=None, gt=0, le=1e4, description="RBF lengthscale on the "
                                      "LayerNorm'd hidden features; null: sqrt(hidden size)")
    ridge: float = Field(default=1.0, gt=0, le=1e4, description="ridge of the Laplace precision ridge * I + "
                         "sum phi phi^T (the GP's noise variance)")
    mean_field_factor: float = Field(default=math.pi / 8, ge=0, le=100, description="lambda in logits / "
                                     "sqrt(1 + lambda var); 0 reads the MAP logits")


class SoftDecaySpec(RequestModel):
    """SoftDecay (Yan et al., UAI 2022) of each example's last-layer token states: singular values s mapped to
    ln(1 + |alpha| s - alpha^2) / |alpha|, the largest kept; alpha fixed (the paper learns it from this start)."""

    alpha: float = Field(default=SOFTDECAY_TUNE_ALPHA, gt=SOFTDECAY_ALPHA_RANGE[0], le=SOFTDECAY_ALPHA_RANGE[1],
                         description="the decay's strength: 0 is the identity, towards -1 flatter spectra "
                         "(default -0.2: the official code's start)")


def _limit(name: str) -> dict[str, float]:
    low, high = LIMITS[name]
    return {"ge": low, "le": high}


class TuneSpec(RequestModel):
    """A job's `tune` block; every default is documented in docs/tuning.md."""

    strategy: Literal[STRATEGIES] = "finetune"  # type: ignore[valid-type]
    top_k: int = Field(default=1, ge=1, le=20, description="finetune: tune the top-k; btuning: number of teachers")
    target: str | None = Field(default=None, max_length=ID_LENGTH,
                               description="model id to tune; default the top-ranked")
    regularizer: RegularizerSpec = Field(default_factory=RegularizerSpec)
    tradeoff: float | list[float] | Literal["auto"] = Field(
        default="auto", description="btuning: weight of the distillation term; \"auto\" (0.01, 0.1, 1, 10, then "
        "100 and 1000 while the largest tried wins) or a list of values picks it by the held-out loss of trial runs "
        "on the training split, one per value")
    temperature: float = Field(default=0.1, gt=0, description="btuning: teacher weights softmax(LogME/T)")
    epochs: int = Field(default=3, **_limit("epochs"))
    lr: float = Field(default=2e-5, gt=LIMITS["lr"][0], le=LIMITS["lr"][1])
    batch_size: int = Field(default=16, **_limit("batch_size"))
    max_length: int = Field(default=128, **_limit("max_length"))
    seed: int = Field(default=0, **_limit("seed"))
    validation_fraction: float = Field(default=0.2, gt=0, lt=0.9)
    augment: AugmentSpec | None = Field(default=None, description="text augmentation of the training rows, "
                                        "afresh every epoch: swap, delete, insert (corpus words) or eda (one of "
                                        "them per row); null: none")
    peft: PeftSpec | None = Field(default=None, description="LoRA adapters instead of full fine-tuning; null: "
                                  "full fine-tuning")
    head: Literal[HEADS] = Field(default="linear", description="the output layer: \"linear\", or \"sngp\" "  # type: ignore[valid-type]
                                 "(spectral-normalised hidden layer and a Gaussian process on random features: "
                                 "calibrated probabilities; single-label classification only)")
    sngp: SngpSpec | None = Field(default=None, description="settings of the SNGP head (head \"sngp\"); null: "
                                  "its defaults")
    softdecay: SoftDecaySpec | None = Field(default=None, description="SoftDecay of the last layer's token "
                                            "states, per example (token uniformity): the singular value spectrum "
                                            "flattened before the head reads them; null: off")
    ood_dataset_id: str | None = Field(default=None, max_length=ID_LENGTH, description="a dataset of yours of "
                                       "the same modality whose rows are out of distribution: each tuned model "
                                       "reports ood_auroc, how well 1 - max probability tells them from the "
                                       "validation rows")

    @field_validator("sngp")
    @classmethod
    def _sngp_with_head(cls, value: SngpSpec | None, info: ValidationInfo) -> SngpSpec | None:
        if value is not None and info.data.get("head") != "sngp":
            raise ValueError('settings of the SNGP head apply with head "sngp"')
        return value

    @field_validator("peft")
    @classmethod
    def _peft_with_regularizer(cls, value: PeftSpec | None, info: ValidationInfo) -> PeftSpec | None:
        regularizer = info.data.get("regularizer")
        name = regularizer.name if isinstance(regularizer, RegularizerSpec) else "none"
        if value is not None and name in PEFT_REFUSED:
            raise ValueError(f"{value.method} cannot be combined with regularizer {name}: {PEFT_REFUSED[name]}")
        return value

    @field_validator("tradeoff", mode="before")
    @classmethod
    def _tradeoff(cls, value: Any) -> Any:
        """One message for the three forms (pydantic's union would report a failure per form)."""
        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0

        if value == "auto" or number(value):
            return value
        if isinstance(value, list) and 1 <= len(value) <= MAX_TRADEOFF_TRIALS and all(number(v) for v in value):
            return value
        raise ValueError(f'expected a number >= 0, a list of 1 to {MAX_TRADEOFF_TRIALS} such numbers, or "auto"; '
                         f"got {value!r}")
