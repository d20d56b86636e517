"""Each regularizer's mechanism, checked against what its paper says, on plain layers or a tiny BERT.

Expected values are computed independently of the code under test (closed forms, hand-worked numbers, brute-force
loops), never from its own output.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.contract.tuning import REGULARIZER_PARAMS, TuneConfig, resolve_regularizer
from tests.tiny_models import make_tiny_bert
from workers.tuning.btuning import BTuningLoss, BTuningTeacher, btuning_penalty, distillation_target, teacher_weights
from workers.tuning.regularizers import (
    L2SP,
    LNSR,
    NFM,
    R3F,
    SMART,
    VAT,
    HyPe,
    MixLinear,
    SelfLabeling,
    SetupInfo,
    SiFT,
    StepContext,
    build_regularizer,
    mix_targets,
    noisy_mixup,
    symmetric_kl,
    transformer_layers,
)

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert", hidden_size=32, num_layers=2)


@pytest.fixture(scope="module")
def tiny_parts(tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3)
    enc = tok(["the team won the game with a late goal", "bank profit and shares rose", "a film star"],
              padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.tensor([0, 1, 2]),
             "index": torch.tensor([0, 1, 2])}
    return model, batch


def fresh(tiny_parts):
    model, batch = tiny_parts
    return copy.deepcopy(model), {k: v.clone() for k, v in batch.items()}


def clean_ctx(model, batch, train: bool = True, want_hidden: bool = False) -> StepContext:
    model.train(train)
    ctx = StepContext(model, batch, "classification", want_hidden=want_hidden)
    ctx.clean_forward()
    return ctx


class Plain(nn.Module):
    """A backbone of two 'layers' and a head, named the way Hugging Face models are."""

    base_model_prefix = "body"

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Module()
        self.body.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for layer in self.body.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


# ---------------------------------------------------------------------------------------------------- none


def test_none_adds_nothing(tiny_parts):
    model, batch = fresh(tiny_parts)
    reference = copy.deepcopy(model)
    reg = build_regularizer("none")
    reg.setup(model, SetupInfo())
    ctx = clean_ctx(model, batch, train=False)
    assert reg.forward_loss(ctx) is None
    assert reg.extra_loss(ctx) is None
    assert reg.example_weights(ctx, torch.ones(3)) is None
    assert torch.equal(reg.relabel(ctx, batch["labels"]), batch["labels"])
    reg.after_step(model)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    with torch.no_grad():
        assert torch.equal(ctx.logits, reference.eval()(input_ids=batch["input_ids"],
                                                        attention_mask=batch["attention_mask"]).logits)


# -------------------------------------------------------------------------------------------------- mixout


def test_mixlinear_p1_gives_pretrained_weights_and_p0_the_current_ones():
    torch.manual_seed(0)
    linear = nn.Linear(6, 3)
    w0 = linear.weight.detach().clone()
    x = torch.randn(5, 6)
    for p, expect_w in ((1.0, "w0"), (0.0, "w")):
        mix = MixLinear(copy.deepcopy(linear), p)
        with torch.no_grad():
            mix.weight.add_(torch.randn_like(mix.weight))  # "training" moved w away from w0
        w = mix.weight.detach().clone()
        mix.train()
        out = mix(x)
        expected = x @ (w0 if expect_w == "w0" else w).T + linear.bias.detach()
        assert torch.allclose(out, expected, atol=1e-6)
        mix.eval()  # eval: always the current weight
        assert torch.allclose(mix(x), x @ w.T + linear.bias.detach(), atol=1e-6)


def test_mixlinear_mixed_weight_is_unbiased_and_columns_are_w_or_w0_rescaled():
    torch.manual_seed(1)
    mix = MixLinear(nn.Linear(8, 4), 0.6)
    with torch.no_grad():
        mix.weight.add_(torch.randn_like(mix.weight))
    w, w0, p = mix.weight.detach(), mix.w0, 0.6
    mix.train()
    n = 4000
    samples = torch.stack([mix.mixed_weight().detach() for _ in range(n)])
    # E[((1-M) w0 + M w - p w0) / (1-p)] = ((p w0 + (1-p) w) - p w0) / (1-p) = w, and each entry's std is
    # sqrt(p (1-p)) |w - w0| / (1-p); the sample mean must be within 5 standard errors
    std = math.sqrt(p * (1 - p)) * (w - w0).abs() / (1 - p)
    assert torch.all((samples.mean(0) - w).abs() <= 5 * std / math.sqrt(n) + 1e-6)
    # one mask per input column: each column is either (w - p w0)/(1-p) (kept) or w0 (swapped back)
    one = samples[0]
    kept = (w - p * w0) / (1 - p)
    for j in range(8):
        col = one[:, j]
        assert torch.allclose(col, kept[:, j], atol=1e-5) or torch.allclose(col, w0[:, j], atol=1e-5)


def test_mixout_on_a_model_with_p1_reproduces_the_pretrained_model(tiny_parts):
    model, batch = fresh(tiny_parts)
    reference = copy.deepcopy(model)
    reg = build_regularizer("mixout", {"p": 1.0})
    reg.setup(model)
    assert any(isinstance(m, MixLinear) for m in model.modules())
    assert not any(isinstance(m, MixLinear) for m in model.classifier.modules())  # the new head is left alone
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MixLinear):
                m.weight.add_(0.5)  # training moved every backbone weight
    model.train()  # mixout active; backbone dropout is off
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    reference.eval()
    torch.manual_seed(3)
    out = model(**inputs).logits
    with torch.no_grad():
        expected = reference.bert(**inputs).pooler_output
    # the head keeps its dropout in train mode: compare through the same dropout draw
    torch.manual_seed(3)
    expected_logits = model.classifier(model.dropout(expected))
    assert torch.allclose(out, expected_logits, atol=1e-5)
    reg.teardown(model)
    assert not any(isinstance(m, MixLinear) for m in model.modules())
    assert set(model.state_dict()) == set(reference.state_dict())


# --------------------------------------------------------------------------------------------------- L2-SP


def test_l2sp_is_zero_at_w0_and_its_gradient_points_back_to_w0():
    torch.manual_seed(0)
    model = Plain()
    alpha = 0.3
    reg = L2SP(alpha=alpha, beta=0.0)
    reg.setup(model)
    assert float(reg.penalty().detach()) == 0.0
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    penalty = reg.penalty()
    # alpha/2 * sum ||w - w0||^2 over the backbone only (head excluded)
    expected = 0.5 * alpha * sum(((p.detach() - w0[n]) ** 2).sum() for n, p in model.named_parameters()
                                 if n.startswith("body."))
    assert math.isclose(float(penalty.detach()), float(expected), rel_tol=1e-6)
    penalty.backward()
    for n, p in model.named_parameters():
        if n.startswith("body."):
            # -grad = alpha (w0 - w): the step direction points back to w0
            assert torch.allclose(-p.grad, alpha * (w0[n] - p.detach()), atol=1e-6)
        else:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0


def test_l2sp_head_term_is_half_beta_squared_norm():
    torch.manual_seed(0)
    model = Plain()
    reg = L2SP(alpha=0.0, beta=0.2)
    reg.setup(model)
    expected = 0.1 * (model.head.weight.detach().pow(2).sum() + model.head.bias.detach().pow(2).sum())
    assert math.isclose(float(reg.penalty()), float(expected), rel_tol=1e-6)


# -------------------------------------------------------------------------------------------- self-labeling


def test_self_labeling_projection_keeps_each_layer_within_its_bound():
    torch.manual_seed(0)
    model = Plain()
    radius, growth, head_radius = 0.1, 2.0, 0.5
    reg = SelfLabeling(radius=radius, growth=growth, relative=True, head_radius=head_radius)
    reg.setup(model)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    # bound of body.layers.i.weight = radius * growth^(i+1) * ||W0||_F (depth i+1), head: ||W|| <= head_radius
    bounds = {f"body.layers.{i}.weight": radius * growth ** (i + 1) * float(w0[f"body.layers.{i}.weight"].norm())
              for i in range(2)}
    with torch.no_grad():
        model.body.layers[0].weight.add_(torch.randn(4, 4) * 10)  # far outside
        model.body.layers[1].weight.add_(torch.full((4, 4), 1e-4))  # inside
        model.head.weight.mul_(100)
        model.body.layers[0].bias.add_(5.0)  # biases are not constrained
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reg.after_step(model)
    after = dict(model.named_parameters())
    for name, bound in bounds.items():
        assert float((after[name] - w0[name]).norm()) <= bound * (1 + 1e-5)
    # outside: moved radially onto the sphere (same direction from W0)
    d_before = before["body.layers.0.weight"] - w0["body.layers.0.weight"]
    d_after = after["body.layers.0.weight"].detach() - w0["body.layers.0.weight"]
    assert math.isclose(float(d_after.norm()), bounds["body.layers.0.weight"], rel_tol=1e-5)
    assert float(F.cosine_similarity(d_before.flatten(), d_after.flatten(), dim=0)) > 1 - 1e-5
    # inside and unconstrained: untouched
    assert torch.equal(after["body.layers.1.weight"].detach(), before["body.layers.1.weight"])
    assert torch.equal(after["body.layers.0.bias"].detach(), before["body.layers.0.bias"])
    assert float(after["head.weight"].norm()) <= head_radius * (1 + 1e-5)


def test_self_labeling_reweights_by_softmax_of_negative_loss_and_relabels_confident_disagreements():
    reg = SelfLabeling(temperature=2.0, threshold=0.9, reweight_start=0.0, relabel_start=0.0)
    reg.setup(Plain(), SetupInfo(task="classification", train_labels=torch.tensor([0, 1, 2, 0])))

    class Ctx:  # the attributes the hooks read
        progress = 0.0
        batch = {"index": torch.tensor([0, 1, 2])}
        logits = torch.tensor([[0.0, 10.0, 0.0],    # confident (p ~ 0.9999) for 1, label 0 -> relabel
                               [0.0, 10.0, 0.0],    # confident and agrees -> keep
                               [1.0, 0.0, 0.0]])    # not confident -> keep

    losses = torch.tensor([0.5, 1.0, 3.0])
    w = reg.example_weights(Ctx, losses)
    e = [math.exp(-0.5 / 2), math.exp(-1.0 / 2), math.exp(-3.0 / 2)]
    assert torch.allclose(w, torch.tensor([x / sum(e) for x in e]), atol=1e-6)
    labels = reg.relabel(Ctx, torch.tensor([0, 1, 2]))
    assert labels.tolist() == [1, 1, 2]
    assert reg.labels.tolist() == [1, 1, 2, 0] and reg.changed == 1
    Ctx.progress = 0.0
    late = SelfLabeling(reweight_start=0.5)
    assert late.example_weights(Ctx, losses) is None  # before reweight_start: plain mean


# ---------------------------------------------------------------------------------------------------- LNSR


def test_lnsr_penalty_is_zero_without_noise_and_grows_like_sigma_squared(tiny_parts):
    model, batch = fresh(tiny_parts)
    values = []
    for sigma in (0.0, 0.01, 0.02, 0.2):
        reg = LNSR(lam=1.0, sigma=sigma, layer=0)
        reg.setup(model)
        torch.manual_seed(5)  # same dropout masks and the same noise direction for every sigma
        ctx = clean_ctx(model, batch, train=True)
        values.append(float(reg.extra_loss(ctx)))
        reg.teardown(model)
    assert values[0] == 0.0  # replayed dropout masks: only the injected noise can change the outputs
    assert values[1] < values[2] < values[3]
    # small noise: the change of every later output is linear in the noise, so the penalty is quadratic
    assert 3.6 < values[2] / values[1] < 4.4


# ------------------------------------------------------------------------------------------------ VAT, SiFT


def test_vat_perturbation_has_the_requested_norm_per_example(tiny_parts):
    model, batch = fresh(tiny_parts)
    ctx = clean_ctx(model, batch, train=True)
    for eps in (0.5, 2.0):
        r = VAT(eps=eps).perturbation(ctx)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        norms = (r * mask).flatten(1).norm(dim=1)
        assert torch.allclose(norms, torch.full_like(norms, eps), rtol=1e-5)
        assert float((r * (1 - mask)).abs().max()) == 0.0  # padding untouched
    assert float(VAT(eps=1.0, lam=1.0).extra_loss(ctx)) > 0


def test_sift_step_has_the_requested_max_norm_per_token_and_a_bounded_start(tiny_parts):
    model, batch = fresh(tiny_parts)
    ctx = clean_ctx(model, batch, train=True)
    init, step = 1e-2, 1e-3
    sift = SiFT(step=step, init=init)
    sift.grad_eps = 1e-30  # the tiny random model's gradients are far below the 1e-6 guard
    delta0, delta = sift.perturbation(ctx)
    mask = batch["attention_mask"].bool()
    assert float(delta0.abs().max()) <= 2 * init + 1e-9
    ascent = (delta - delta0)[mask]  # (tokens, H) in LayerNorm-normalised units
    per_token = ascent.abs().amax(-1)
    assert torch.allclose(per_token, torch.full_like(per_token, step), rtol=1e-3)
    assert float(delta[~mask].abs().max()) == 0.0


# ------------------------------------------------------------------------------------------------ SMART, R3F


def test_symmetric_kl_matches_a_hand_computation():
    a = torch.tensor([[1.0, 0.0, -1.0], [0.2, 0.3, 0.1]])
    b = torch.tensor([[0.0, 0.5, 0.0], [0.2, 0.3, 0.1]])
    total = 0.0
    for row_a, row_b in zip(a.tolist(), b.tolist()):
        pa = np.exp(row_a) / np.exp(row_a).sum()
        pb = np.exp(row_b) / np.exp(row_b).sum()
        total += np.sum(pa * np.log(pa / pb)) + np.sum(pb * np.log(pb / pa))
    assert math.isclose(float(symmetric_kl(a, b, "classification")), total / 2, rel_tol=1e-5)


@pytest.mark.parametrize("name", ["smart", "r3f"])
def test_smart_and_r3f_symmetric_kl_is_zero_without_noise_and_positive_with_it(tiny_parts, name):
    model, batch = fresh(tiny_parts)
    zero = {"smart": SMART(noise=0.0, step=0.0), "r3f": R3F(eps=0.0)}[name]
    some = {"smart": SMART(noise=1e-2, step=1e-2), "r3f": R3F(eps=1e-2)}[name]
    torch.manual_seed(0)
    ctx = clean_ctx(model, batch, train=True)  # dropout on: the perturbed pass replays the same masks
    assert float(zero.extra_loss(ctx)) == 0.0
    assert float(some.extra_loss(ctx)) > 0.0


def test_smart_ascent_step_has_the_requested_max_norm_per_token(tiny_parts):
    model, batch = fresh(tiny_parts)
    ctx = clean_ctx(model, batch, train=True)
    smart = SMART(noise=1e-3, step=1e-3)
    smart.grad_eps = 1e-30  # the tiny random model's gradients are far below the 1e-6 guard
    delta0, delta = smart.perturbation(ctx)
    mask = batch["attention_mask"].bool()
    per_token = (delta - delta0)[mask].abs().amax(-1)
    assert torch.allclose(per_token, torch.full_like(per_token, 1e-3), rtol=1e-3)
    assert float(delta[~mask].abs().max()) == 0.0


# ---------------------------------------------------------------------------------------------------- HyPe


def test_hype_changes_layer_inputs_only_in_training(tiny_parts):
    model, batch = fresh(tiny_parts)
    eps = 0.3
    reg = HyPe(eps=eps, noise="uniform")
    reg.setup(model)
    seen, emb = {}, {}
    layers = transformer_layers(model)
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, args, kwargs, i=i: seen.__setitem__(i, args[0].detach()),
                                        with_kwargs=True)
    model.bert.embeddings.register_forward_hook(lambda m, a, out: emb.__setitem__("out", out.detach()))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    model.eval()
    with torch.no_grad():
        model(**inputs)
    assert torch.equal(seen[0], emb["out"])
    model.train()  # dropout was turned off by HyPe, so the only difference is the noise
    with torch.no_grad():
        model(**inputs)
    diff = seen[0] - emb["out"]
    assert float(diff.min()) >= 0.0 and float(diff.max()) < eps and float(diff.abs().mean()) > eps / 4
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))
    reg.teardown(model)
    assert any(m.p > 0 for m in model.modules() if isinstance(m, nn.Dropout))


# ----------------------------------------------------------------------------------------------------- NFM


def test_noisy_mixup_without_noise_is_the_convex_combination():
    x = torch.arange(12.0).reshape(3, 4)
    index = torch.tensor([2, 0, 1])
    mixed = noisy_mixup(x, 0.25, index)
    assert torch.allclose(mixed, 0.25 * x + 0.75 * x[index])
    soft = mix_targets(torch.tensor([0, 1, 2]), 0.25, index, "classification", num_classes=3)
    assert torch.allclose(soft, torch.tensor([[0.25, 0, 0.75], [0.75, 0.25, 0], [0, 0.75, 0.25]]))


def test_nfm_loss_mixes_the_labels_with_the_sampled_lambda(tiny_parts):
    model, batch = fresh(tiny_parts)
    model.train()
    reg = NFM(alpha=1.0, add_noise=0.4, mult_noise=0.2, manifold=True)
    lams = []
    for seed in range(3):
        torch.manual_seed(seed)
        ctx = StepContext(model, batch, "classification")
        logits, loss = reg.forward_loss(ctx)
        lam, index = reg.last_lam, reg.last_index
        lams.append(lam)
        y = batch["labels"]
        expected = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[index])
        assert math.isclose(float(loss), float(expected), rel_tol=1e-5)
        assert 0 <= reg.last_layer < len(transformer_layers(model))
    assert len(set(lams)) == 3 and all(0 < v < 1 for v in lams)
    # lambda ~ Beta(1, 1) = U(0, 1): check the sampler's mean
    torch.manual_seed(0)
    draws = torch.distributions.Beta(torch.tensor(1.0), torch.tensor(1.0)).sample((4000,))
    assert abs(float(draws.mean()) - 0.5) < 0.02


# ---------------------------------------------------------------------------------------------- parameters


def test_unknown_or_invalid_parameters_raise_naming_the_field():
    with pytest.raises(ValueError, match="regularizer.params.pp"):
        build_regularizer("mixout", {"pp": 0.3})
    with pytest.raises(ValueError, match="regularizer.params.p"):
        build_regularizer("mixout", {"p": 1.5})
    with pytest.raises(ValueError, match="regularizer.name"):
        build_regularizer("dropconnect")
    with pytest.raises(ValueError, match="regularizer.params.noise"):
        build_regularizer("r3f", {"noise": "laplace"})
    with pytest.raises(ValueError, match="lr"):
        TuneConfig(lr=-1.0).validate()
    with pytest.raises(ValueError, match="epochs"):
        TuneConfig.from_dict({"epochs": 0})
    with pytest.raises(ValueError, match="warmup"):
        TuneConfig.from_dict({"warmup": 0.1})
    config = TuneConfig.from_dict({"regularizer": {"name": "smart", "params": {"lam": 2}}})
    assert config.resolved_regularizer_params() == {"lam": 2.0, "noise": 1e-5, "step": 1e-5, "norm": "inf"}


def test_every_registered_regularizer_builds_with_its_documented_defaults():
    for name, specs in REGULARIZER_PARAMS.items():
        reg = build_regularizer(name)
        assert reg.name == name
        assert reg.params == resolve_regularizer(name) == {k: s.default for k, s in specs.items()}
        assert all(s.doc for s in specs.values())


# ------------------------------------------------------------------------------------------------ B-Tuning


def test_teacher_weights_are_softmax_of_scores_over_temperature():
    scores, t = [1.0, 0.9, 0.5], 0.1
    e = [math.exp(s / t) for s in scores]
    assert np.allclose(teacher_weights(scores, t), [x / sum(e) for x in e])
    assert np.allclose(teacher_weights([2.0, 2.0], 5.0), [0.5, 0.5])


def test_distillation_target_is_the_weighted_sum_of_teacher_linear_predictions():
    rng = np.random.default_rng(0)
    n, c = 5, 3
    feats = [rng.normal(size=(n, 4)), rng.normal(size=(n, 7))]  # teachers of different widths
    ms = [rng.normal(size=(c, 4)), rng.normal(size=(c, 7))]
    pi = [0.7, 0.3]
    target = distillation_target(feats, ms, pi)
    for i in range(n):
        for j in range(c):
            brute = sum(pi[k] * sum(feats[k][i, d] * ms[k][j, d] for d in range(feats[k].shape[1]))
                        for k in range(2))
            assert math.isclose(target[i, j], brute, rel_tol=1e-10, abs_tol=1e-12)
    teacher = BTuningTeacher(feats, ms, scores=[0.3, 0.1], student_weights=rng.normal(size=(c, 6)),
                             temperature=0.1)
    pi2 = teacher_weights([0.3, 0.1], 0.1)
    assert np.allclose(teacher.target, pi2[0] * feats[0] @ ms[0].T + pi2[1] * feats[1] @ ms[1].T)


def test_btuning_term_is_zero_when_the_student_prediction_equals_the_target():
    rng = np.random.default_rng(1)
    n, c, d_t = 4, 3, 6
    hidden = torch.tensor(rng.normal(size=(n, 5, d_t)), dtype=torch.float32)
    mask = torch.ones(n, 5, dtype=torch.long)
    mask[0, 3:] = 0
    m_t = rng.normal(size=(c, d_t))
    # phi = mean over the unmasked tokens, computed by hand
    phi = np.stack([hidden[i, : int(mask[i].sum())].numpy().mean(0) for i in range(n)])
    target = phi @ m_t.T
    teacher = BTuningTeacher([phi], [m_t], scores=[0.0], student_weights=m_t)  # one teacher == the student
    piece = BTuningLoss(teacher, tradeoff=3.0)
    piece.setup(nn.Linear(1, 1))

    class Ctx:
        pass

    ctx = Ctx()
    ctx.hidden, ctx.mask, ctx.batch, ctx.is_image = hidden, mask, {"index": torch.arange(n)}, False
    assert float(piece.extra_loss(ctx)) < 1e-9
    # a known offset: every prediction off by 0.5 in each of C outputs -> 3.0 * C * 0.25
    shifted = torch.tensor(target + 0.5, dtype=torch.float32)
    value = btuning_penalty(torch.tensor(phi, dtype=torch.float32), torch.tensor(m_t, dtype=torch.float32), shifted)
    assert math.isclose(float(value), c * 0.25, rel_tol=1e-4)
