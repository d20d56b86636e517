"""The protocol every piece follows (`Regularizer`, see the package docstring), the `StepContext` that carries one
batch through a step, and the losses and pooled features the pieces share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.tuning.regularizers.anatomy import input_embedding

# ------------------------------------------------------------------------------------------ losses and divergences


def per_example_loss(logits: Tensor, labels: Tensor, task: str) -> Tensor:
    """Task loss of each example (B,): cross-entropy, mean binary cross-entropy over labels, or mean squared error."""
    logits = logits.float()
    if task == "classification":
        if labels.dim() == 2:  # soft targets
            return -(labels * F.log_softmax(logits, -1)).sum(-1)
        return F.cross_entropy(logits, labels.long(), reduction="none")
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(-1)
    if task == "regression":
        target = labels.float().reshape(logits.shape)
        return ((logits - target) ** 2).mean(-1)
    raise ValueError(f"unknown task {task!r}")


def kl_divergence(p_logits: Tensor, q_logits: Tensor, task: str) -> Tensor:
    """Batch mean of KL(p || q) between the model's predictive distributions (Gaussian, unit variance, for
    regression: half the squared distance)."""
    p_logits, q_logits = p_logits.float(), q_logits.float()
    if task == "classification":
        logp, logq = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
        return (logp.exp() * (logp - logq)).sum(-1).mean()
    if task == "multilabel":
        p = torch.sigmoid(p_logits)
        lp1, lp0 = F.logsigmoid(p_logits), F.logsigmoid(-p_logits)
        lq1, lq0 = F.logsigmoid(q_logits), F.logsigmoid(-q_logits)
        return (p * (lp1 - lq1) + (1 - p) * (lp0 - lq0)).sum(-1).mean()
    return 0.5 * ((p_logits - q_logits) ** 2).sum(-1).mean()


def symmetric_kl(a_logits: Tensor, b_logits: Tensor, task: str) -> Tensor:
    """Batch mean of KL(a || b) + KL(b || a); gradients flow into both sides (as fairseq's R3F).

    Uses KL(p||q) + KL(q||p) = sum (p - q)(log p - log q), which is exactly 0 when a == b.
    """
    a_logits, b_logits = a_logits.float(), b_logits.float()
    if task == "classification":
        la, lb = F.log_softmax(a_logits, -1), F.log_softmax(b_logits, -1)
        return ((la.exp() - lb.exp()) * (la - lb)).sum(-1).mean()
    if task == "multilabel":  # per label: (p - q)(logit p - logit q)
        return ((torch.sigmoid(a_logits) - torch.sigmoid(b_logits)) * (a_logits - b_logits)).sum(-1).mean()
    return ((a_logits - b_logits) ** 2).sum(-1).mean()


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the hidden states over the attended tokens (B, D)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def _last_hidden_state(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output.last_hidden_state


def pooled_features(ctx: StepContext, pooling: str = "mean") -> Tensor:
    """The clean forward's features (B, D) pooled as ranking pools them (workers.features), so that a linear map
    fitted on ranking's features applies to them: text "mean" averages the last hidden states over the attention
    mask, "head" takes the token a sequence-classification head reads (the last real token of a decoder-only model,
    the first otherwise; either padding side); images: "mean" through features.pool_image_output, "head" the input
    of the classifier's last linear layer."""
    from workers.features import is_decoder_only, pool_image_output

    if ctx.is_image:
        if ctx.backbone_output is None:
            raise ValueError("pooled_features needs the clean forward run with want_hidden")
        if pooling == "head" and ctx.head_input is not None:  # what the classifier reads, as ranking takes it
            return ctx.head_input.float()
        return pool_image_output(ctx.backbone_output, pooling)
    if ctx.hidden is None:
        raise ValueError("pooled_features needs the clean forward run with want_hidden")
    hidden = ctx.hidden.float()
    if pooling == "mean":
        return mean_pool(hidden, ctx.mask)
    mask = ctx.mask
    positions = torch.arange(mask.shape[1], device=mask.device)
    if is_decoder_only(ctx.model.config):
        at = (mask * positions).argmax(1)  # the last attended position
    else:
        at = mask.argmax(1)  # the first attended position
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), at]


# -------------------------------------------------------------------------------------------------- step context


def get_rng_state(device: torch.device | None) -> tuple[Tensor, Tensor | None]:
    cuda = None
    if device is not None and device.type == "cuda":
        cuda = torch.cuda.get_rng_state(device)
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device | None) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


@dataclass
class SetupInfo:
    """What a piece may need to know about the run when it is set up."""

    task: str = "classification"
    train_labels: Tensor | None = None  # (N,) ints, (N, C) 0/1 or (N, T) floats, in dataset order
    total_steps: int = 1
    steps_per_epoch: int = 1


class StepContext:
    """One batch passing through one training step (see the module docstring)."""

    def __init__(self, model: nn.Module, batch: dict[str, Tensor], task: str, *, step: int = 0,
                 total_steps: int = 1, steps_per_epoch: int = 1, want_hidden: bool = False) -> None:
        self.model = model
        self.batch = batch
        self.task = task
        self.step = step
        self.total_steps = max(1, total_steps)
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.want_hidden = want_hidden
        self.device = next(iter(batch.values())).device
        self.rng_state = get_rng_state(self.device)  # taken before the clean forward: replayed by forward()
        self.logits: Tensor | None = None
        self.hidden: Tensor | None = None  # last hidden state of the clean forward when want_hidden
        self.backbone_output: Any = None  # image models: the backbone's output of the clean forward (want_hidden)
        self.head_input: Tensor | None = None  # image models: the input of the classifier's last linear layer
        self.embeds: Tensor | None = None  # clean input embeddings (detached)

    @property
    def progress(self) -> float:
        """Fraction of training done before this step, in [0, 1)."""
        return self.step / self.total_steps

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    @property
    def labels(self) -> Tensor:
        return self.batch["labels"]

    @property
    def mask(self) -> Tensor:
        """(B, L) attention mask; for images, ones over the pixel positions (B, H, W) of `embeds`."""
        if self.is_image:
            pixels = self.batch["pixel_values"]
            return torch.ones((pixels.shape[0], *pixels.shape[2:]), dtype=torch.long, device=pixels.device)
        return self.batch["attention_mask"]

    @property
    def is_image(self) -> bool:
        return "pixel_values" in self.batch

    def forward(self, perturb: Callable[[Tensor], Tensor] | None = None, *, attention_mask: Tensor | None = None,
                want_hidden: bool = False, replay: bool = True) -> tuple[Tensor, Tensor | None]:
        """Run the model on this batch: (logits, last hidden state or None).

        perturb maps the (B, L, H) input embeddings to the ones the model sees; for an image model, the normalised
        pixels seen channel-last, (B, H, W, C): the input space of adversarial training on images (VAT's), and one
        that every vision architecture has. replay=True reruns with the random state the clean forward started
        from, then puts the generator back where it was. attention_mask does not apply to images (ignored).
        """
        saved = get_rng_state(self.device) if replay else None
        if replay:
            set_rng_state(self.rng_state, self.device)
        try:
            return self._run(perturb, attention_mask, want_hidden, capture=False)
        finally:
            if saved is not None:
                set_rng_state(saved, self.device)

    def clean_forward(self) -> tuple[Tensor, Tensor | None]:
        """The step's main forward: records logits, the last hidden state and the clean embeddings."""
        self.rng_state = get_rng_state(self.device)
        logits, hidden = self._run(None, None, self.want_hidden, capture=True)
        self.logits, self.hidden = logits, hidden
        return logits, hidden

    def _run(self, perturb: Callable[[Tensor], Tensor] | None, attention_mask: Tensor | None, want_hidden: bool,
             capture: bool) -> tuple[Tensor, Tensor | None]:
        if self.is_image:
            pixels = self.batch["pixel_values"]
            channels_last = pixels.permute(0, 2, 3, 1)
            if capture:
                self.embeds = channels_last.detach()
            if perturb is not None:
                pixels = perturb(channels_last).permute(0, 3, 1, 2)
            if not want_hidden:
                return self.model(pixel_values=pixels).logits, None
            # the backbone's own output, as ranking reads it (hidden_states[-1] can be a CNN's last stage before
            # its final convolution, or a ViT's tokens before the final layer norm)
            from workers.features import backbone, classifier_layer

            kept: list[Any] = []
            read: list[Tensor] = []
            handles = [backbone(self.model).register_forward_hook(lambda _m, _a, output: kept.append(output))]
            layer = classifier_layer(self.model, self.model.config.num_labels)
            if layer is not None:
                handles.append(layer.register_forward_hook(lambda _m, args, _out: read.append(args[0])))
            try:
                out = self.model(pixel_values=pixels)
            finally:
                for handle in handles:
                    handle.remove()
            if capture:
                self.backbone_output = kept[-1]
                self.head_input = read[-1].flatten(1) if read else None
            return out.logits, _last_hidden_state(kept[-1])
        embedding = input_embedding(self.model)
        calls = [0]

        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            calls[0] += 1
            if calls[0] > 1:  # an encoder-decoder sharing one embedding: the decoder's inputs stay clean
                return output
            if capture:
                self.embeds = output.detach()
            return perturb(output) if perturb is not None else output

        handle = embedding.register_forward_hook(hook)
        try:
            kwargs = {"input_ids": self.batch["input_ids"],
                      "attention_mask": self.mask if attention_mask is None else attention_mask}
            if "token_type_ids" in self.batch:
                kwargs["token_type_ids"] = self.batch["token_type_ids"]
            if want_hidden:
                kwargs["output_hidden_states"] = True
            out = self.model(**kwargs)
        finally:
            handle.remove()
        # encoder-decoder classifiers (T5, BART) report encoder_hidden_states: the encoder's, as ranking reads
        states = getattr(out, "hidden_states", None) or getattr(out, "encoder_hidden_states", None)
        hidden = states[-1] if want_hidden else None
        return out.logits, hidden


# ------------------------------------------------------------------------------------------------ the protocol


class Regularizer:
    """Base piece: does nothing. Subclasses override the hooks they need (see the module docstring)."""

    name = "none"
    needs_hidden_states = False
    # Perturbations far below bfloat16's resolution (~4e-3 relative) vanish under autocast: such pieces make the
    # loop run in float32 even on CUDA.
    needs_fp32 = False

    def __init__(self, **params: Any) -> None:
        self.params = params

    def setup(self, model: nn.Module, info: SetupInfo | None = None) -> None:
        pass

    def forward_loss(self, ctx: StepContext) -> tuple[Tensor, Tensor] | None:
        return None

    def relabel(self, ctx: StepContext, labels: Tensor) -> Tensor:
        return labels

    def example_weights(self, ctx: StepContext, losses: Tensor) -> Tensor | None:
        return None

    def extra_loss(self, ctx: StepContext) -> Tensor | None:
        return None

    def after_backward(self, model: nn.Module, loss: Tensor, recompute: Callable[[], Tensor]) -> None:
        """After loss.backward(), before clipping and the optimizer step; `recompute()` replaces the gradients
        with those of the step's total loss at the model's current weights and returns that loss."""

    def after_step(self, model: nn.Module) -> None:
        pass

    def teardown(self, model: nn.Module) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class NoRegularizer(Regularizer):
    """Plain fine-tuning."""

    name = "none"

