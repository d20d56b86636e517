"""SoftDecay (workers/ranking/softdecay.py, workers/tuning/softdecay.py): the singular values follow the formula on a
hand-computed example, the singular vectors stay, the spectrum's skew drops on a skewed matrix, the torch twin is
the numpy function with finite gradients where torch's SVD backward has none, and as a tuning option it transforms
the last layer's token states per example and a tiny model still learns."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from service.contract import TuneConfig, TuneSpec, check_tune_for_dataset
from tests.tiny_models import make_tiny_bert
from tests.unit.test_tuning import NAMES, TRAIN, VAL, config
from workers.ranking.softdecay import apply_feature_transform, decayed_singular_values, softdecay, spectrum_skew
from workers.tuning.softdecay import (
    SoftDecayHook,
    read_softdecay_config,
    softdecay_tokens,
    softdecay_torch,
)

torch.set_num_threads(1)


def rotation(n: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return q


def skewed(rows: int = 200, cols: int = 48, seed: int = 0) -> np.ndarray:
    """Rows sharing one large mean direction plus a decaying spectrum: a 'uniform' representation matrix."""
    rng = np.random.default_rng(seed)
    spectrum = 3.0 * 0.85 ** np.arange(cols)
    return 8.0 + rng.normal(size=(rows, cols)) * spectrum


# ------------------------------------------------------------------------------------------------ the formula


def test_hand_computed_3x2_singular_values_and_vectors():
    # M = R3 diag(3, 1) R2^T: singular values 3 and 1. RMS of the entries sqrt((9 + 1) / 6) = 1.290994, so in
    # unit-RMS units s = (2.323790, 0.774597). alpha = -0.5: f(s) = ln(1 + 0.5 s - 0.25) / 0.5 = 2 ln(0.75 + 0.5 s)
    # f(2.323790) = 2 ln(1.911895) = 1.296190, f(0.774597) = 2 ln(1.137298) = 0.257311; the largest is kept (3),
    # the second becomes 3 * 0.257311 / 1.296190 = 0.595540.
    left, right = rotation(3, 1), rotation(2, 2)
    m = left[:, :2] @ np.diag([3.0, 1.0]) @ right.T
    out = softdecay(m, -0.5)
    u, s, vt = np.linalg.svd(out, full_matrices=False)
    np.testing.assert_allclose(s, [3.0, 0.595540], atol=1e-6)
    # the same singular vectors, up to sign
    np.testing.assert_allclose(np.abs(np.sum(u * left[:, :2], axis=0)), [1.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(np.abs(np.sum(vt.T * right, axis=0)), [1.0, 1.0], atol=1e-12)


def test_decayed_values_are_the_soft_exponential_rescaled():
    s = np.array([10.0, 4.0, 1.0, 0.3, 0.1])
    alpha = -0.3
    f = [math.log(1 - alpha * (x + alpha)) / -alpha for x in s]
    expected = [max(v, 0.0) * 10.0 / f[0] for v in f]
    np.testing.assert_allclose(decayed_singular_values(s, alpha), expected, rtol=1e-12)
    assert decayed_singular_values(s, alpha)[-1] == 0.0  # 0.1 < |alpha|: f < 0, clamped


def test_alpha_zero_is_the_identity_and_bad_alphas_are_refused():
    m = skewed(20, 8).astype(np.float32)
    assert np.array_equal(softdecay(m, 0.0), m) and softdecay(m, 0.0).dtype == np.float32
    for bad in (-1.0, -1.5, 0.1, float("nan"), True, "x"):
        with pytest.raises(ValueError, match="alpha"):
            softdecay(m, bad)  # type: ignore[arg-type]
    near_zero = softdecay(m.astype(np.float64), -1e-9)  # continuous at 0
    np.testing.assert_allclose(near_zero, m, rtol=1e-6, atol=1e-5)


def test_spectrum_skew_drops_strictly_and_more_with_a_more_negative_alpha():
    m = skewed()
    skews = [spectrum_skew(softdecay(m, a)) for a in (0.0, -0.2, -0.6)]
    assert skews[0] > skews[1] > skews[2], skews
    assert skews[2] < 0.5 * skews[0]
    # near -1 the tail below |alpha| (unit-RMS units) is dropped, which adds skew back: still far below the start
    assert spectrum_skew(softdecay(m, -0.9)) < 0.5 * skews[0]


def test_large_singular_values_are_lifted_and_the_tail_under_alpha_dropped():
    m = skewed()
    rms = np.sqrt(np.mean(m ** 2))
    before = np.linalg.svd(m, compute_uv=False)
    after = np.linalg.svd(softdecay(m, -0.6), compute_uv=False)
    assert after[0] == pytest.approx(before[0], rel=1e-10)  # the largest is kept
    large = before / rms >= 3.0  # above the peak of f(s) / s (about 2.2 for alpha -0.6): relative to s_1, lifted
    assert large.sum() >= 5 and np.all((after / after[0])[large][1:] > (before / before[0])[large][1:])
    tail = before / rms < 0.6
    assert tail.any() and np.all(after[tail] < 1e-9 * after[0])


def test_rows_become_less_uniform():
    """The paper's symptom: rows (tokens) nearly parallel. Their mean pairwise cosine similarity drops."""
    def mean_cosine(x: np.ndarray) -> float:
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        sims = unit @ unit.T
        return float((sims.sum() - len(x)) / (len(x) * (len(x) - 1)))

    m = skewed()
    assert mean_cosine(softdecay(m, -0.6)) < mean_cosine(m) - 0.05


def test_scale_shape_dtype_rows_and_stacks():
    m = skewed(60, 24)
    out = softdecay(m, -0.6)
    np.testing.assert_allclose(softdecay(7.5 * m, -0.6), 7.5 * out, rtol=1e-10)  # scale-equivariant
    assert out.shape == m.shape and out.dtype == np.float64
    assert softdecay(m.astype(np.float32), -0.6).dtype == np.float32
    order = np.random.default_rng(3).permutation(len(m))
    np.testing.assert_allclose(softdecay(m[order], -0.6), out[order], rtol=1e-9, atol=1e-9)  # rows are rows
    np.testing.assert_allclose(softdecay(m.T, -0.6), out.T, rtol=1e-9, atol=1e-9)  # tokens x dims or dims x tokens
    stack = np.stack([m, 2 * m[::-1]])
    np.testing.assert_allclose(softdecay(stack, -0.6), np.stack([out, 2 * out[::-1]]), rtol=1e-9, atol=1e-9)
    # not idempotent: a second pass flattens further
    assert spectrum_skew(softdecay(out, -0.6)) < spectrum_skew(out)
    with pytest.raises(ValueError, match="2 dimensions"):
        softdecay(np.ones(4), -0.5)
    assert np.array_equal(softdecay(np.zeros((3, 4)), -0.5), np.zeros((3, 4)))


def test_feature_transform_none_is_the_same_array():
    m = skewed(30, 8)
    assert apply_feature_transform(m, None) is m
    assert apply_feature_transform(m, {"name": "none"}) is m
    np.testing.assert_array_equal(apply_feature_transform(m, {"name": "softdecay", "alpha": -0.6}), softdecay(m, -0.6))


# ------------------------------------------------------------------------------------------------ torch twin


def test_torch_twin_matches_numpy_and_its_gradient_is_the_numeric_one():
    for shape in ((12, 30), (30, 12)):
        m = skewed(*shape, seed=4)
        np.testing.assert_allclose(softdecay_torch(torch.tensor(m), -0.4).numpy(), softdecay(m, -0.4), atol=1e-9)
        x = torch.tensor(m[:6, :5] if shape[0] < shape[1] else m[:7, :3], requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: softdecay_torch(t, -0.4), (x,))


@pytest.mark.parametrize("matrix", [torch.eye(4, 6) * 3, torch.cat([torch.randn(3, 6), torch.zeros(3, 6)])],
                         ids=["repeated", "zero-rows"])
def test_gradients_stay_finite_where_svd_backward_gives_nan(matrix):
    weights = torch.randn(matrix.shape, dtype=torch.float64)
    svd_input = matrix.double().clone().requires_grad_(True)
    u, s, vh = torch.linalg.svd(svd_input, full_matrices=False)
    (((u * s.sqrt()) @ vh) * weights).sum().backward()  # any spectral map through the SVD's own backward
    assert not svd_input.grad.isfinite().all()
    ours = matrix.double().clone().requires_grad_(True)
    (softdecay_torch(ours, -0.2) * weights).sum().backward()
    assert ours.grad.isfinite().all()


def test_tokens_are_transformed_per_example_without_padding():
    hidden = torch.tensor(np.stack([skewed(10, 16, seed=5), skewed(10, 16, seed=6)]))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    out = softdecay_tokens(hidden, mask, -0.5)
    np.testing.assert_allclose(out[0].numpy(), softdecay(hidden[0].numpy(), -0.5), atol=1e-9)
    np.testing.assert_allclose(out[1, :7].numpy(), softdecay(hidden[1, :7].numpy(), -0.5), atol=1e-9)
    assert torch.equal(out[1, 7:], hidden[1, 7:])


# ------------------------------------------------------------------------------------------------ tuning option


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def test_hook_changes_the_last_layers_spectrum_as_the_function_says(bert_dir):
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(bert_dir), AutoModel.from_pretrained(bert_dir).eval()
    batch = tokenizer(["the match ended in a draw", "shares fell after the results were announced today"],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        plain = model(**batch).last_hidden_state
        hook = SoftDecayHook(model, -0.5)
        transformed = model(**batch).last_hidden_state
        hook.remove()
        again = model(**batch).last_hidden_state
    assert torch.equal(again, plain)  # removed: the model as it was
    for row, length in enumerate(batch["attention_mask"].sum(1).tolist()):
        expected = softdecay(plain[row, :length].double().numpy(), -0.5)
        np.testing.assert_allclose(transformed[row, :length].numpy(), expected, atol=1e-5)
        assert spectrum_skew(transformed[row, :length].numpy()) < spectrum_skew(plain[row, :length].numpy())
        assert torch.equal(transformed[row, length:], plain[row, length:])


def test_contract_defaults_and_refusals():
    assert TuneSpec(softdecay={}).softdecay.alpha == -0.2  # the official code's starting alpha
    assert TuneConfig(softdecay={"alpha": -0.3}).validate().softdecay == {"alpha": -0.3}
    with pytest.raises(ValueError, match="softdecay"):
        TuneConfig(softdecay={"alpha": -1.0}).validate()
    with pytest.raises(ValueError, match="tune.softdecay"):
        check_tune_for_dataset({"softdecay": {"alpha": -0.2}}, "image")


def test_a_tiny_model_trains_with_softdecay_and_its_checkpoint_carries_it(bert_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from workers.tuning.loop import train
    from workers.tuning.softdecay import install_softdecay

    run = config(softdecay={"alpha": -0.3})
    result = train(run, bert_dir, TRAIN, VAL, "classification", NAMES, tmp_path / "ckpt", tmp_path / "state")
    assert result.curve[-1]["train_loss"] < result.curve[0]["train_loss"]
    assert result.metrics["accuracy"] >= 0.9
    assert read_softdecay_config(tmp_path / "ckpt")["alpha"] == -0.3
    plain = train(config(), bert_dir, TRAIN, VAL, "classification", NAMES, tmp_path / "p", tmp_path / "ps")
    assert plain.metrics["val_loss"] != result.metrics["val_loss"]  # the transform took part
    # reloaded with the hook, the checkpoint gives the run's validation outputs
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt").eval()
    install_softdecay(model, read_softdecay_config(tmp_path / "ckpt"))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    batch = tokenizer(list(VAL[0]), padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1).numpy()
    assert float(np.mean(predicted == np.asarray(VAL[1]))) == pytest.approx(result.metrics["accuracy"])
