"""Regularized fine-tuning as composable pieces with one small protocol.

A piece (a `Regularizer`) may do any of these; the training loop (workers/tuning/loop.py) calls them in this order:

    setup(model, info)        once, on the freshly loaded pretrained model: record w0, wrap layers, register hooks
    forward_loss(ctx)         replace the plain forward + task loss (noisy feature mixup)    -> (logits, loss) | None
    relabel(ctx, labels)      change this batch's labels (self-labeling)                     -> labels
    example_weights(ctx, l)   weights of the per-example losses, summing to 1 (self-labeling) -> weights | None
    extra_loss(ctx)           a term added to the task loss (L2-SP, SMART, R3F, VAT, SiFT, LNSR, B-Tuning)
    after_step(model)         after optimizer.step(): project weights (self-labeling)
    teardown(model)           undo wrappers and hooks before the model is saved
    state_dict/load_state_dict   whatever must survive a resume (self-labeling's corrected labels)

`StepContext` carries one batch through a step: the model, the batch, the task, the clean logits, and
`ctx.forward(perturb=...)`, which reruns the model with `perturb` applied to the input (word) embeddings, the
tensor Hugging Face calls `inputs_embeds`. It is applied by a forward hook on `model.get_input_embeddings()` so
that `input_ids` still reach the model (decoder classifiers find each sequence's last token from them). By default
it replays the random state of the clean forward, so dropout masks (and HyPe noise) are the same in the clean and
the perturbed pass and a penalty measures the perturbation alone: with zero noise it is exactly zero.

Registry: `build_regularizer(name, params)`; names, defaults and meanings are in workers/tuning/params.py.
Pure tensors in, tensors out: no files, database or HTTP here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.contract.tuning import REGULARIZER_PARAMS, resolve_regularizer

# ----------------------------------------------------------------------------------------------- model anatomy


def backbone_and_head(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """Split parameters into the pretrained backbone and the new head.

    Hugging Face models name their backbone `model.base_model_prefix` (bert, model, roberta...): everything under
    it came from the checkpoint, the rest (classifier, score) is the task head. Other modules count as backbone.
    """
    prefix = getattr(model, "base_model_prefix", None)
    named = list(model.named_parameters())
    if not prefix or not isinstance(getattr(model, prefix, None), nn.Module):
        return named, []
    backbone = [(n, p) for n, p in named if n == prefix or n.startswith(prefix + ".")]
    head = [(n, p) for n, p in named if not (n == prefix or n.startswith(prefix + "."))]
    return backbone, head


def backbone_module(model: nn.Module) -> nn.Module:
    prefix = getattr(model, "base_model_prefix", None)
    sub = getattr(model, prefix, None) if prefix else None
    return sub if isinstance(sub, nn.Module) else model


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of Transformer blocks: the longest ModuleList of same-class modules in the backbone."""
    best: nn.ModuleList | None = None
    for module in backbone_module(model).modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise ValueError("no stack of Transformer layers found in this model")
    return best


_LAYER_INDEX = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")


def _depth(name: str, num_layers: int) -> int:
    """0 for embeddings, i+1 for Transformer layer i, num_layers+1 for what follows (pooler, final norm)."""
    match = _LAYER_INDEX.search(name)
    if match:
        return int(match.group(1)) + 1
    if "embed" in name:
        return 0
    return num_layers + 1


def _first_tensor(value: Any) -> Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def _replace_first(value: Any, tensor: Tensor) -> Any:
    if isinstance(value, tuple):
        return (tensor,) + tuple(value[1:])
    if isinstance(value, list):
        return [tensor] + list(value[1:])
    return tensor


def _layer_input_hook(fn: Callable[[Tensor], Tensor]) -> Callable:
    """A forward pre-hook (with kwargs) that maps a layer's hidden-state input through `fn`."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        if "hidden_states" in kwargs:
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = fn(kwargs["hidden_states"])
            return args, kwargs
        return None

    return hook


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


def pooled_features(ctx: "StepContext", pooling: str = "mean") -> Tensor:
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

    def _run(self, perturb, attention_mask, want_hidden, capture: bool) -> tuple[Tensor, Tensor | None]:
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


def input_embedding(model: nn.Module) -> nn.Module:
    """The module whose output are the token embeddings the model reads: for an encoder-decoder (T5, BART) the
    encoder's own embed_tokens, a module apart from the shared one get_input_embeddings() returns (a hook there
    never fires); otherwise get_input_embeddings()."""
    if getattr(model.config, "is_encoder_decoder", False):
        base = model.base_model
        encoder = base.get_encoder() if hasattr(base, "get_encoder") else None
        tokens = getattr(encoder, "embed_tokens", None)
        if tokens is not None:
            return tokens
    return model.get_input_embeddings()


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


def _set_dropout(module: nn.Module, p: float | None, saved: dict[nn.Dropout, float]) -> None:
    for sub in module.modules():
        if isinstance(sub, nn.Dropout):
            if p is None:  # restore
                sub.p = saved.get(sub, sub.p)
            else:
                saved.setdefault(sub, sub.p)
                sub.p = p


# ------------------------------------------------------------------------------------------------------- L2-SP


class L2SP(Regularizer):
    """alpha/2 * ||w - w0||^2 over the backbone + beta/2 * ||w||^2 over the head (Li et al. 2018; TLlib)."""

    name = "l2sp"

    def __init__(self, alpha: float = 0.01, beta: float = 0.01) -> None:
        super().__init__(alpha=alpha, beta=beta)
        self.alpha, self.beta = alpha, beta
        self._backbone: list[tuple[nn.Parameter, Tensor]] = []
        self._head: list[nn.Parameter] = []

    def setup(self, model: nn.Module, info: SetupInfo | None = None) -> None:
        backbone, head = backbone_and_head(model)
        self._backbone = [(p, p.detach().clone()) for _, p in backbone if p.requires_grad]
        self._head = [p for _, p in head if p.requires_grad]

    def penalty(self) -> Tensor:
        device = self._backbone[0][0].device if self._backbone else self._head[0].device
        total = torch.zeros((), device=device)
        if self.alpha:
            total = total + 0.5 * self.alpha * sum(((p - p0) ** 2).sum() for p, p0 in self._backbone)
        if self.beta and self._head:
            total = total + 0.5 * self.beta * sum((p ** 2).sum() for p in self._head)
        return total

    def extra_loss(self, ctx: StepContext) -> Tensor:
        return self.penalty()


# ------------------------------------------------------------------------------------------------------ Mixout


class MixLinear(nn.Linear):
    """nn.Linear whose weight is mixed back to w0 in training (Lee et al. 2020):

        W = ((1 - M) * w0 + M * w - p * w0) / (1 - p),  M ~ Bernoulli(1 - p) per input column (as the reference
        draws one mask row and repeats it over the output rows); p = 1 gives w0, p = 0 gives w; E[W] = w.
    The weight and bias Parameters are the wrapped Linear's own (the optimizer's references stay valid); w0 is a
    non-persistent buffer, so state dicts look like the plain Linear's. In eval mode it is the plain Linear.
    """

    def __init__(self, linear: nn.Linear, p: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("w0", linear.weight.detach().clone(), persistent=False)
        self.p = float(p)

    def mixed_weight(self) -> Tensor:
        if not self.training or self.p == 0.0:
            return self.weight
        if self.p == 1.0:
            return self.w0 + 0.0 * self.weight  # keeps the graph; the gradient to w is zero
        keep = torch.empty(self.in_features, device=self.weight.device).bernoulli_(1.0 - self.p)
        keep = keep.to(self.weight.dtype).unsqueeze(0)  # (1, in): one mask per input column
        return ((1.0 - keep) * self.w0 + keep * self.weight - self.p * self.w0) / (1.0 - self.p)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.mixed_weight(), self.bias)

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        linear.weight = self.weight
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mixout={self.p}"


class Mixout(Regularizer):
    """Replace every backbone nn.Linear by a MixLinear mixing toward its pretrained weight; the new head is left
    as it is (it has no pretrained weight). Backbone dropout is turned off by default (reference HF example)."""

    name = "mixout"

    def __init__(self, p: float = 0.7, disable_dropout: bool = True) -> None:
        super().__init__(p=p, disable_dropout=disable_dropout)
        self.p, self.disable_dropout = p, disable_dropout
        self._dropout: dict[nn.Dropout, float] = {}

    def setup(self, model: nn.Module, info: SetupInfo | None = None) -> None:
        root = backbone_module(model)
        targets = [(name, m) for name, m in root.named_modules() if type(m) is nn.Linear]
        for name, linear in targets:
            parent_name, _, child = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            setattr(parent, child, MixLinear(linear, self.p))
        if self.disable_dropout:
            _set_dropout(root, 0.0, self._dropout)

    def teardown(self, model: nn.Module) -> None:
        root = backbone_module(model)
        for name, module in list(root.named_modules()):
            if isinstance(module, MixLinear):
                parent_name, _, child = name.rpartition(".")
                parent = root.get_submodule(parent_name) if parent_name else root
                setattr(parent, child, module.to_linear())
        _set_dropout(root, None, self._dropout)


# --------------------------------------------------------------------------------- embedding-space perturbations


def _token_mask(ctx: StepContext, like: Tensor) -> Tensor:
    return ctx.mask.unsqueeze(-1).to(like.dtype)


def _normalise_per_token(g: Tensor, norm: str, eps: float = 1e-6) -> Tensor:
    if norm == "l2":
        return g / (g.norm(dim=-1, keepdim=True) + eps)
    return g / (g.abs().amax(-1, keepdim=True) + eps)


def _normalise_per_example(d: Tensor, mask: Tensor, eps: float = 1e-12) -> Tensor:
    d = d * mask
    norm = d.flatten(1).norm(dim=1).clamp_min(eps)
    return d / norm.view(-1, *([1] * (d.dim() - 1)))


class SMART(Regularizer):
    """Smoothness-inducing adversarial regularization (Jiang et al. 2020, as in mt-dnn's SmartPerturbation):
    delta0 ~ N(0, noise^2) on the input embeddings; one ascent step on KL(p(x) || p(x + delta)) normalised per
    token by its max-abs (or L2) norm; then lam * symKL(f(x + delta), f(x)). (mt-dnn restarts the ascent from the
    clean embedding, dropping delta0; we keep delta0 + step * direction, as the paper's algorithm writes it.)"""

    name = "smart"
    needs_fp32 = True

    def __init__(self, lam: float = 1.0, noise: float = 1e-5, step: float = 1e-5, norm: str = "inf") -> None:
        super().__init__(lam=lam, noise=noise, step=step, norm=norm)
        self.lam, self.noise, self.step, self.norm = lam, noise, step, norm

    grad_eps = 1e-6  # guard in the normalisation g / (max|g| + grad_eps), mt-dnn's adv_epsilon

    def perturbation(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """(delta0, delta): the initial noise and the perturbation after the ascent step."""
        assert ctx.embeds is not None and ctx.logits is not None
        mask = _token_mask(ctx, ctx.embeds)
        delta0 = (torch.randn_like(ctx.embeds) * self.noise * mask).requires_grad_(True)
        adv_logits, _ = ctx.forward(lambda e: e + delta0)
        adv = kl_divergence(ctx.logits.detach(), adv_logits, ctx.task)
        (grad,) = torch.autograd.grad(adv, delta0)
        if not torch.isfinite(grad).all():
            return delta0.detach(), delta0.detach()
        step = self.step * _normalise_per_token(grad, self.norm, self.grad_eps) * mask
        return delta0.detach(), (delta0 + step).detach()

    def extra_loss(self, ctx: StepContext) -> Tensor:
        _, delta = self.perturbation(ctx)
        adv_logits, _ = ctx.forward(lambda e: e + delta)
        return self.lam * symmetric_kl(adv_logits, ctx.logits, ctx.task)


class R3F(Regularizer):
    """Better fine-tuning by reducing representational collapse (Aghajanyan et al. 2021; fairseq rxf):
    lam * symKL(f(emb), f(emb + z)), z ~ U(-eps, eps) or N(0, eps^2), no ascent step."""

    name = "r3f"
    needs_fp32 = True

    def __init__(self, lam: float = 1.0, eps: float = 1e-5, noise: str = "uniform") -> None:
        super().__init__(lam=lam, eps=eps, noise=noise)
        self.lam, self.eps, self.noise = lam, eps, noise

    def extra_loss(self, ctx: StepContext) -> Tensor:
        assert ctx.embeds is not None and ctx.logits is not None
        if self.noise == "uniform":
            z = (torch.rand_like(ctx.embeds) * 2 - 1) * self.eps
        else:
            z = torch.randn_like(ctx.embeds) * self.eps
        z = z * _token_mask(ctx, z)
        noised, _ = ctx.forward(lambda e: e + z)
        return self.lam * symmetric_kl(noised, ctx.logits, ctx.task)


class VAT(Regularizer):
    """Virtual adversarial training (Miyato et al. 2018): d random with per-token norm xi; one power iteration
    g = grad_d KL(p(x) || p(x + d)); r_adv = eps * g / ||g|| per example over its unpadded tokens;
    loss lam * KL(p(x) || p(x + r_adv)) with p(x) held fixed."""

    name = "vat"
    needs_fp32 = True

    def __init__(self, lam: float = 1.0, xi: float = 1e-6, eps: float = 1.0) -> None:
        super().__init__(lam=lam, xi=xi, eps=eps)
        self.lam, self.xi, self.eps = lam, xi, eps

    def perturbation(self, ctx: StepContext) -> Tensor:
        assert ctx.embeds is not None and ctx.logits is not None
        mask = _token_mask(ctx, ctx.embeds)
        d = torch.randn_like(ctx.embeds)
        d = (self.xi * d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12) * mask).requires_grad_(True)
        probe, _ = ctx.forward(lambda e: e + d)
        dist = kl_divergence(ctx.logits.detach(), probe, ctx.task)
        (grad,) = torch.autograd.grad(dist, d)
        if not torch.isfinite(grad).all() or grad.abs().max() == 0:
            grad = d.detach()  # flat at this point: fall back to the random direction
        return (self.eps * _normalise_per_example(grad, mask)).detach()

    def extra_loss(self, ctx: StepContext) -> Tensor:
        r_adv = self.perturbation(ctx)
        adv_logits, _ = ctx.forward(lambda e: e + r_adv)
        return self.lam * kl_divergence(ctx.logits.detach(), adv_logits, ctx.task)


def _layer_norm_stats(e: Tensor, eps: float = 1e-7) -> tuple[Tensor, Tensor]:
    mean = e.mean(-1, keepdim=True)
    std = (e.var(-1, keepdim=True, unbiased=False) + eps).sqrt()
    return mean, std


class SiFT(Regularizer):
    """Scale-invariant fine-tuning (DeBERTa's sift.py): the perturbation lives in LayerNorm-normalised embedding
    coordinates, n = (e - mean) / std per token. delta0 ~ N(0, init^2) clipped to +-2*init; one ascent step
    delta = delta0 + step * g / max|g| per token, g = grad symKL(f(n + delta0), f(x)); loss lam * symKL(f(n +
    delta), f(x)). DeBERTa feeds n + delta into the embedding LayerNorm; to work on models without one, we map
    back to embedding units, e + std * delta (the same point when a LayerNorm follows)."""

    name = "sift"

    def __init__(self, lam: float = 5.0, step: float = 1e-4, init: float = 1e-2) -> None:
        super().__init__(lam=lam, step=step, init=init)
        self.lam, self.step, self.init = lam, step, init

    grad_eps = 1e-6  # guard in g / (grad_eps + max|g|), as sift.py

    def perturbation(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """(delta0, delta) in normalised units."""
        assert ctx.embeds is not None and ctx.logits is not None
        mask = _token_mask(ctx, ctx.embeds)
        _, std = _layer_norm_stats(ctx.embeds.float())
        std = std.to(ctx.embeds.dtype)
        delta0 = torch.randn_like(ctx.embeds).mul(self.init).clamp(-2 * self.init, 2 * self.init) * mask
        delta0.requires_grad_(True)
        pert, _ = ctx.forward(lambda e: e + std * delta0)
        (grad,) = torch.autograd.grad(symmetric_kl(pert, ctx.logits.detach(), ctx.task), delta0)
        if not torch.isfinite(grad).all():
            return delta0.detach(), delta0.detach()
        delta = delta0 + self.step * _normalise_per_token(grad, "inf", self.grad_eps) * mask
        return delta0.detach(), delta.detach()

    def extra_loss(self, ctx: StepContext) -> Tensor:
        _, delta = self.perturbation(ctx)
        _, std = _layer_norm_stats(ctx.embeds.float())
        std = std.to(ctx.embeds.dtype)
        pert, _ = ctx.forward(lambda e: e + std * delta)
        return self.lam * symmetric_kl(pert, ctx.logits, ctx.task)


# ------------------------------------------------------------------------------------ hidden-state perturbations


class LNSR(Regularizer):
    """Layer-wise noise stability regularization (Hua et al. 2021): add Gaussian noise of std sigma to the input
    of Transformer layer `layer` and penalise sum_j lambda_j * mean over tokens ||f_j(h + noise) - f_j(h)||^2 over
    the outputs f_j of that layer and every later one, lambda_j = lam / (number of such layers). The clean
    outputs come from the step's main forward; the noisy pass replays its dropout masks."""

    name = "lnsr"

    def __init__(self, lam: float = 1.0, sigma: float = 0.05, layer: int = 0) -> None:
        super().__init__(lam=lam, sigma=sigma, layer=layer)
        self.lam, self.sigma, self.layer = lam, sigma, int(layer)
        self._handles: list[Any] = []
        self._outputs: dict[int, Tensor] = {}
        self._noise: Tensor | None = None
        self._input_shape: torch.Size | None = None

    def setup(self, model: nn.Module, info: SetupInfo | None = None) -> None:
        layers = transformer_layers(model)
        if self.layer >= len(layers):
            raise ValueError(f"regularizer.params.layer: {self.layer} >= the model's {len(layers)} layers")

        def add_noise(h: Tensor) -> Tensor:
            if self._noise is None:
                self._input_shape = h.shape  # the clean pass: the noise is drawn in this shape (a strided CNN
                return h  # block's input is larger than its output)
            return h + self._noise.to(h.dtype)

        self._handles.append(layers[self.layer].register_forward_pre_hook(_layer_input_hook(add_noise),
                                                                          with_kwargs=True))
        for j in range(self.layer, len(layers)):
            def record(module: nn.Module, args: tuple, output: Any, j: int = j) -> None:
                if module.training and torch.is_grad_enabled():
                    self._outputs[j] = _first_tensor(output)
            self._handles.append(layers[j].register_forward_hook(record))

    def penalty(self, clean: dict[int, Tensor], noisy: dict[int, Tensor], mask: Tensor | None) -> Tensor:
        """sum_j lambda_j * mean over positions of the squared change of each position's vector: tokens (B, L, H)
        under the attention mask, or a CNN's feature maps (B, C, H, W) over their H x W positions (mask None)."""
        weight = self.lam / max(1, len(clean))
        total = torch.zeros((), device=next(iter(clean.values())).device)
        for j, h in clean.items():
            diff = noisy[j].float() - h.float()
            if diff.dim() == 4:
                total = total + weight * (diff ** 2).sum(1).mean()
                continue
            sq = (diff ** 2).sum(-1)  # (B, L)
            m = torch.ones_like(sq) if mask is None or mask.shape != sq.shape else mask.to(torch.float32)
            total = total + weight * (sq * m).sum() / m.sum().clamp_min(1.0)
        return total

    def extra_loss(self, ctx: StepContext) -> Tensor:
        clean = dict(self._outputs)
        if not clean:
            raise RuntimeError("lnsr: the clean forward recorded no layer outputs (model not in train mode?)")
        # Drawn before the replayed forward so the noisy pass consumes the random stream exactly as the clean one
        # did (same dropout masks everywhere).
        like = clean[self.layer]
        shape = self._input_shape or like.shape
        self._noise = torch.randn(shape, dtype=torch.float32, device=like.device) * self.sigma
        try:
            ctx.forward()
        finally:
            self._noise = None
        noisy = dict(self._outputs)
        self._outputs.clear()
        return self.penalty(clean, noisy, None if ctx.is_image else ctx.mask)

    def teardown(self, model: nn.Module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()


class HyPe(Regularizer):
    """Hidden representation perturbation (Yuan et al. 2023): in training only, add eps * U(0, 1) (the official
    code's `uniform_()`) or eps * N(0, 1) noise to every Transformer layer's input; no extra loss; dropout off."""

    name = "hype"
    needs_fp32 = True

    def __init__(self, eps: float = 1e-5, noise: str = "uniform", disable_dropout: bool = True) -> None:
        super().__init__(eps=eps, noise=noise, disable_dropout=disable_dropout)
        self.eps, self.noise, self.disable_dropout = eps, noise, disable_dropout
        self._handles: list[Any] = []
        self._dropout: dict[nn.Dropout, float] = {}

    def setup(self, model: nn.Module, info: SetupInfo | None = None) -> None:
        for layer in transformer_layers(model):
            def perturb(h: Tensor, layer: nn.Module = layer) -> Tensor:
                if not layer.training:
                    return h
                noise = torch.rand_like(h) if self.noise == "uniform" else torch.randn_like(h)
                return h + self.eps * noise
            self._handles.append(layer.register_forward_pre_hook(_layer_input_hook(perturb), with_kwargs=True))
        if self.disable_dropout:
            _set_dropout(model, 0.0, self._dropout)

    def teardown(self, model: nn.Module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        _set_dropout(model, None, self._dropout)


# ---------------------------------------------------------------------------------------- noisy feature mixup


def noisy_mixup(x: Tensor, lam: float, index: Tensor, add_noise: float = 0.0, mult_noise: float = 0.0
                ) -> Tensor:
    """lam * x + (1 - lam) * x[index], then NFM's noise: * (1 + mult * Beta(2,5) * U(-1, 1)) and
    + add * Beta(2,5) * rms(x) * N(0, 1) (erichson/NFM `_noise`, with the additive level in units of rms(x))."""
    mixed = lam * x + (1.0 - lam) * x[index]
    beta25 = torch.distributions.Beta(torch.tensor(2.0), torch.tensor(5.0))
    if mult_noise > 0:
        level = mult_noise * float(beta25.sample())
        mixed = mixed * (1.0 + level * (2.0 * torch.rand_like(mixed) - 1.0))
    if add_noise > 0:
        level = add_noise * float(beta25.sample())
        rms = x.detach().float().pow(2).mean().sqrt().to(x.dtype)
        mixed = mixed + level * rms * torch.randn_like(mixed)
    return mixed


def mix_targets(labels: Tensor, lam: float, index: Tensor, task: str, num_classes: int | None = None) -> Tensor:
    """The mixed targets lam * y + (1 - lam) * y[index] (one-hot first for classification)."""
    if task == "classification":
        y = F.one_hot(labels.long(), num_classes).float()
    else:
        y = labels.float()
    return lam * y + (1.0 - lam) * y[index]


class NFM(Regularizer):
    """Noisy feature mixup (Lim et al. 2022): pick a layer k (the input of Transformer layer k, uniformly among
    all layers when manifold, else the embedding output), replace its input by noisy_mixup(h, lam, perm) with
    lam ~ Beta(alpha, alpha), and train on lam * loss(y) + (1 - lam) * loss(y[perm]). Mixed sequences attend
    to the union of both attention masks."""

    name = "nfm"

    def __init__(self, alpha: float = 1.0, add_noise: float = 0.4, mult_noise: float = 0.2,
                 manifold: bool = True) -> None:
        super().__init__(alpha=alpha, add_noise=add_noise, mult_noise=mult_noise, manifold=manifold)
        self.alpha, self.add_noise, self.mult_noise, self.manifold = alpha, add_noise, mult_noise, manifold
        self.last_lam: float | None = None
        self.last_index: Tensor | None = None
        self.last_layer: int | None = None

    def forward_loss(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        layers = transformer_layers(ctx.model)
        batch = ctx.labels.shape[0]
        lam = float(torch.distributions.Beta(torch.tensor(float(self.alpha)), torch.tensor(float(self.alpha)))
                    .sample()) if self.alpha > 0 else 1.0
        index = torch.randperm(batch).to(ctx.device)
        k = int(torch.randint(len(layers), ())) if self.manifold else 0
        self.last_lam, self.last_index, self.last_layer = lam, index, k

        def mix(h: Tensor) -> Tensor:
            return noisy_mixup(h, lam, index, self.add_noise, self.mult_noise)

        handle = layers[k].register_forward_pre_hook(_layer_input_hook(mix), with_kwargs=True)
        try:
            mask = torch.maximum(ctx.mask, ctx.mask[index])
            logits, _ = ctx.forward(attention_mask=mask, replay=False)
        finally:
            handle.remove()
        ctx.logits = logits
        loss = (lam * per_example_loss(logits, ctx.labels, ctx.task).mean()
                + (1.0 - lam) * per_example_loss(logits, ctx.labels[index], ctx.task).mean())
        return logits, loss


# ---------------------------------------------------------------------------------- regularized self-labeling


def project_frobenius(w: Tensor, center: Tensor | None, radius: float) -> Tensor:
    """The point of the ball ||w - center||_F <= radius closest to w (radial scaling, as the repo's constraint)."""
    diff = w if center is None else w - center
    norm = diff.norm()
    if norm <= radius:
        return w
    scaled = diff * (radius / norm)
    return scaled if center is None else center + scaled


class SelfLabeling(Regularizer):
    """Regularized self-labeling (Li & Zhang, NeurIPS 2021; VirtuosoResearch/Regularized-Self-Labeling):

    - after every step, each weight matrix W of backbone depth l is projected onto ||W - W0||_F <= D_l with
      D_l = radius * growth^l (* ||W0||_F when relative), depth 0 the embeddings, i+1 Transformer layer i; the
      head's matrices onto ||W||_F <= head_radius. Biases and norm weights are not constrained (as the repo).
    - from `reweight_start` of training, the batch loss is sum_i w_i loss_i, w = softmax(-loss / T) over the batch,
      T = temperature * max(0.5, exp(-3 (progress - reweight_start))) (the repo's 0.1 per epoch over 30 epochs).
    - from `relabel_start`, an example's stored label becomes the model's prediction when its top probability
      exceeds `threshold` and disagrees (classification). The corrected labels survive a resume (state_dict).
    """

    name = "self_labeling"

    def __init__(self, radius: float = 0.05, growth: float = 1.2, relative: bool = True, head_radius: float = 10.0,
                 temperature: float = 2.0, threshold: float = 0.9, reweight_start: float = 1 / 6,
                 relabel_start: float = 1 / 3) -> None:
        super().__init__(radius=radius, growth=growth, relative=relative, head_radius=head_radius,
                         temperature=temperature, threshold=threshold, reweight_start=reweight_start,
                         relabel_start=relabel_start)
        self.radius, self.growth, self.relative = radius, growth, relative
        self.head_radius, self.temperature, self.threshold = head_radius, temperature, threshold
        self.reweight_start, self.relabel_start = reweight_start, relabel_start
        self.constraints: list[tuple[str, nn.Parameter, Tensor | None, float]] = []  # name, W, W0, bound
        self.labels: Tensor | None = None
        self.task = "classification"
        self.changed = 0

    def setup(self, model: nn.Module, info: SetupInfo | None = None) -> None:
        backbone, head = backbone_and_head(model)
        try:
            num_layers = len(transformer_layers(model))
        except ValueError:
            num_layers = max([_depth(n, 0) for n, _ in backbone] + [0])
        self.constraints = []
        for name, p in backbone:
            if p.dim() != 2 or not p.requires_grad:
                continue
            bound = self.radius * self.growth ** _depth(name, num_layers)
            w0 = p.detach().clone()
            if self.relative:
                bound *= float(w0.norm())
            self.constraints.append((name, p, w0, bound))
        for name, p in head:
            if p.dim() == 2 and p.requires_grad:
                self.constraints.append((name, p, None, self.head_radius))
        if info is not None:
            self.task = info.task
            if info.train_labels is not None and info.task == "classification":
                self.labels = info.train_labels.detach().clone().long()

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        for _, p, w0, bound in self.constraints:
            p.copy_(project_frobenius(p, w0, bound))

    def current_temperature(self, progress: float) -> float:
        return self.temperature * max(0.5, math.exp(-3.0 * max(0.0, progress - self.reweight_start)))

    def example_weights(self, ctx: StepContext, losses: Tensor) -> Tensor | None:
        if ctx.progress < self.reweight_start:
            return None
        return torch.softmax(-losses.detach().float() / self.current_temperature(ctx.progress), dim=0)

    @torch.no_grad()
    def relabel(self, ctx: StepContext, labels: Tensor) -> Tensor:
        if self.labels is None or self.task != "classification" or "index" not in ctx.batch:
            return labels
        if self.labels.device != labels.device:
            self.labels = self.labels.to(labels.device)
        index = ctx.batch["index"]
        if ctx.progress >= self.relabel_start and ctx.logits is not None:
            conf, pred = torch.softmax(ctx.logits.detach().float(), -1).max(-1)
            change = (conf > self.threshold) & (pred != self.labels[index])
            self.labels[index[change]] = pred[change]
            self.changed += int(change.sum())
        return self.labels[index]

    def state_dict(self) -> dict[str, Any]:
        return {"labels": None if self.labels is None else self.labels.cpu(), "changed": self.changed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("labels") is not None:
            self.labels = state["labels"].clone()
        self.changed = int(state.get("changed", 0))


# ------------------------------------------------------------------------------------------------------ registry

_IMPLEMENTATIONS: tuple[type[Regularizer], ...] = (NoRegularizer, L2SP, Mixout, SMART, R3F, VAT, SiFT, LNSR, HyPe,
                                                     NFM, SelfLabeling)
REGULARIZERS: dict[str, type[Regularizer]] = {cls.name: cls for cls in _IMPLEMENTATIONS}
# The contract names every regularizer a job may ask for; each must be implemented here (checked at import).
if set(REGULARIZERS) != set(REGULARIZER_PARAMS):
    raise ImportError(f"regularizers without an implementation: {sorted(set(REGULARIZER_PARAMS) - set(REGULARIZERS))};"
                      f" implementations outside the contract: {sorted(set(REGULARIZERS) - set(REGULARIZER_PARAMS))}")


def build_regularizer(name: str, params: dict[str, Any] | None = None) -> Regularizer:
    """The named piece with its defaults overlaid by `params`; ValueError names an unknown name or parameter."""
    resolved = resolve_regularizer(name, params)
    return REGULARIZERS[name](**resolved)

