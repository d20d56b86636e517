"""The model-selection suite's claims: agreement and chance levels, combined rankings, derived candidates, and the
data writers it builds its sets with."""

import itertools
import math

import numpy as np
import pytest

from benchmarks.data.sklearn_tables import serialise_row
from benchmarks.selection_report import agreement, mean_rank, random_order, truths


def test_agreement_rel_at_k_against_hand_computed_values():
    truth = [0.50, 0.90, 0.70, 0.80, 0.60]
    a = agreement([3.0, 1.0, 4.0, 2.0, 0.0], truth)  # order: model 2 (0.7), 0 (0.5), 3 (0.8), ...
    assert a["rel1"] == pytest.approx(0.7 / 0.9)
    assert a["rel3"] == pytest.approx(0.8 / 0.9)
    assert a["kendall"] == pytest.approx(-0.2)  # 4 concordant pairs, 6 discordant
    assert agreement([1.0, 1.0, 1.0, 1.0, 1.0], truth) is None  # a saturated estimator ranks nothing


def test_random_order_expectations_match_enumeration():
    from scipy import stats

    truth = [0.2, 0.9, 0.5, 0.7]
    expected = random_order(truth, draws=4000)
    perms = list(itertools.permutations(range(4)))
    rel1 = np.mean([truth[p.index(max(p))] for p in perms]) / 0.9
    rel3 = np.mean([max(truth[i] for i in range(4) if p[i] >= 1) for p in perms]) / 0.9
    wt = np.mean([stats.weightedtau(np.array(p, float), truth).statistic for p in perms])
    assert expected["rel1"] == pytest.approx(rel1)
    assert expected["rel3"] == pytest.approx(rel3)
    assert expected["weightedtau"] == pytest.approx(wt, abs=0.03)
    assert expected["kendall"] == 0.0


def test_mean_rank_combines_two_rankings_and_needs_both_complete():
    models = ["a", "b", "c"]
    combined = mean_rank([{"a": 3.0, "b": 2.0, "c": 1.0}, {"a": 1.0, "b": 3.0, "c": 2.0}], models)
    assert combined == {"a": -2.0, "b": -1.5, "c": -2.5}
    assert mean_rank([{"a": 1.0, "b": None, "c": 0.0}, {"a": 1.0, "b": 2.0, "c": 0.0}], models) is None


def test_finetune_truth_is_the_best_learning_rate_mean_over_seeds():
    runs = {f"{m}|{lr}|{s}": {"model": m, "lr": lr, "seed": s, "quality": q}
            for m, lr, s, q in [("a", 1e-5, 0, 0.5), ("a", 1e-5, 1, 0.7), ("a", 1e-4, 0, 0.65), ("a", 1e-4, 1, 0.65),
                                ("b", 1e-5, 0, 0.4), ("b", 1e-4, 0, 0.3)]}
    store = {"meta": {"models": ["a", "b"]}, "probe_truth": {"a": {"last": 0.6, "all": 0.8}, "b": {"last": 0.5}},
             "finetune": runs}
    t = truths(store)
    assert t["probe"] == {"a": 0.8, "b": 0.5}
    assert t["finetune"]["a"] == pytest.approx(0.65) and t["finetune"]["b"] == pytest.approx(0.4)


def test_lift_sentence_names_every_column_once():
    sentence = serialise_row(["age", "bmi"], [59.0, 32.1])
    assert sentence == "age is 59, bmi is 32.1"
    with pytest.raises(ValueError):
        serialise_row(["age"], [1.0, 2.0])


def test_a_model_cut_to_k_layers_reads_like_the_full_models_kth_hidden_state(tmp_path):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from demo.prepare_hub import build_truncated, parse_truncated, truncated_name
    from tests.tiny_models import make_tiny_bert

    full = make_tiny_bert(tmp_path / "full", num_layers=3)
    build_truncated(full, 2, tmp_path / "cut")
    tok = AutoTokenizer.from_pretrained(full)
    batch = tok(["the team won the match"], return_tensors="pt")
    with torch.no_grad():
        states = AutoModel.from_pretrained(full).eval()(**batch, output_hidden_states=True).hidden_states
        cut = AutoModel.from_pretrained(tmp_path / "cut").eval()(**batch).last_hidden_state
    assert AutoModel.from_pretrained(tmp_path / "cut").config.num_hidden_layers == 2
    assert torch.allclose(cut, states[2], atol=1e-6)
    assert not torch.allclose(cut, states[3], atol=1e-3)
    assert parse_truncated(truncated_name("all-mpnet-base-v2", 4)) == ("all-mpnet-base-v2", 4)
    assert parse_truncated("all-mpnet-base-v2") is None and parse_truncated("nope-first-2-layers") is None
    with pytest.raises(ValueError):
        build_truncated(full, 3, tmp_path / "too-deep")
    assert math.isfinite(float(cut.abs().sum()))
