"""Regularized fine-tuning as composable pieces with one small protocol.

A piece (a `Regularizer`) may do any of these; the training loop (workers/tuning/loop.py) calls them in this order:

    setup(model, info)        once, on the freshly loaded pretrained model: record w0, wrap layers, register hooks
    forward_loss(ctx)         replace the plain forward + task loss (noisy feature mixup)    -> (logits, loss) | None
    relabel(ctx, labels)      change this batch's labels (self-labeling)                     -> labels
    example_weights(ctx, l)   weights of the per-example losses, summing to 1 (self-labeling) -> weights | None
    extra_loss(ctx)           a term added to the task loss (L2-SP, SMART, R3F, VAT, SiFT, LNSR, B-Tuning)
    after_backward(model, loss, recompute)   after backward, before the step: replace the gradients (SAM: by
                              those of the whole loss, every piece's terms included, at perturbed weights)
    after_step(model)         after optimizer.step(): project weights (self-labeling)
    teardown(model)           undo wrappers and hooks before the model is saved
    state_dict/load_state_dict   whatever must survive a resume (self-labeling's corrected labels)

`StepContext` carries one batch through a step: the model, the batch, the task, the clean logits, and
`ctx.forward(perturb=...)`, which reruns the model with `perturb` applied to the input (word) embeddings, the
tensor Hugging Face calls `inputs_embeds`. It is applied by a forward hook on `model.get_input_embeddings()` so
that `input_ids` still reach the model (decoder classifiers find each sequence's last token from them). By default
it replays the random state of the clean forward, so dropout masks (and HyPe noise) are the same in the clean and
the perturbed pass and a penalty measures the perturbation alone: with zero noise it is exactly zero.

Registry: `build_regularizer(name, params)`; names, defaults and meanings are in service/contract/tuning.py.
Pure tensors in, tensors out: no files, database or HTTP here.

The pieces by family: weight_space (L2-SP, Mixout, self-labeling: where the weights may go), adversarial (SMART,
R3F, VAT, SiFT: perturbed input embeddings), noise (LNSR, HyPe, noisy feature mixup: noise in hidden states),
sharpness (SAM, ASAM: the gradient taken at the worst nearby weights); base holds the protocol and
`StepContext`, anatomy finds a model's backbone, head and layers.
"""
from __future__ import annotations

from typing import Any

from service.contract.tuning import REGULARIZER_PARAMS, resolve_regularizer
from workers.tuning.regularizers.adversarial import R3F, SMART, VAT, SiFT
from workers.tuning.regularizers.anatomy import (
    backbone_and_head,
    backbone_module,
    input_embedding,
    layer_depth,
    transformer_layers,
)
from workers.tuning.regularizers.base import (
    NoRegularizer,
    Regularizer,
    SetupInfo,
    StepContext,
    kl_divergence,
    mean_pool,
    per_example_loss,
    pooled_features,
    symmetric_kl,
)
from workers.tuning.regularizers.noise import LNSR, NFM, HyPe, mix_targets, noisy_mixup
from workers.tuning.regularizers.sharpness import SAM, sam_perturbation
from workers.tuning.regularizers.weight_space import L2SP, MixLinear, Mixout, SelfLabeling, project_frobenius

__all__ = ["HyPe", "L2SP", "LNSR", "MixLinear", "Mixout", "NFM", "NoRegularizer", "R3F", "REGULARIZERS", "SAM",
           "SMART", "SelfLabeling", "SetupInfo", "SiFT", "StepContext", "VAT", "Regularizer", "backbone_and_head",
           "backbone_module", "build_regularizer", "input_embedding", "kl_divergence", "layer_depth", "mean_pool",
           "mix_targets", "noisy_mixup", "per_example_loss", "pooled_features", "project_frobenius", "sam_perturbation",
           "symmetric_kl", "transformer_layers"]


_IMPLEMENTATIONS: tuple[type[Regularizer], ...] = (NoRegularizer, L2SP, Mixout, SMART, R3F, VAT, SiFT, LNSR, HyPe,
                                                     NFM, SelfLabeling, SAM)
REGULARIZERS: dict[str, type[Regularizer]] = {cls.name: cls for cls in _IMPLEMENTATIONS}
# The contract names every regularizer a job may ask for; each must be implemented here (checked at import).
if set(REGULARIZERS) != set(REGULARIZER_PARAMS):
    raise ImportError(f"regularizers without an implementation: {sorted(set(REGULARIZER_PARAMS) - set(REGULARIZERS))};"
                      f" implementations outside the contract: {sorted(set(REGULARIZERS) - set(REGULARIZER_PARAMS))}")


def build_regularizer(name: str, params: dict[str, Any] | None = None) -> Regularizer:
    """The named piece with its defaults overlaid by `params`; ValueError names an unknown name or parameter."""
    resolved = resolve_regularizer(name, params)
    return REGULARIZERS[name](**resolved)

