"""The ranking verdict: confidence from paired replicates, ties, saturation, the labels-only and size baselines."""

import numpy as np

from workers.ranking.verdict import degenerate_estimators, p_better, ranking_verdict, static_baseline

NAMES = {"a": "A", "b": "B", "c": "C"}


def test_p_better_counts_ties_as_half() -> None:
    assert p_better(np.array([2.0, 1.0, 1.0, 0.0]), np.array([1.0, 1.0, 2.0, 0.0])) == 0.5
    assert p_better(np.ones(5) * 3, np.ones(5)) == 1.0


def test_confident_when_top_beats_every_other_model_in_95_percent_of_replicates() -> None:
    rng = np.random.default_rng(0)
    reps = {"a": 10 + rng.normal(0, 0.1, 400), "b": 5 + rng.normal(0, 0.1, 400), "c": rng.normal(0, 0.1, 400)}
    scores = {"a": {"logme": 10.0}, "b": {"logme": 5.0}, "c": {"logme": 0.0}}
    v = ranking_verdict(["a", "b", "c"], NAMES, "logme", reps, scores, prior=-1.0,
                        parameters={"a": 10, "b": 20, "c": 30}, rows=100)
    assert v["top"] == "a" and v["confident"] and v["indistinguishable_from_top"] == []
    assert v["below_prior"] == [] and v["degenerate_estimators"] == []
    assert v["static_baseline"] == {"by": "parameters", "available": True, "top": "c", "agrees_on_top": False,
                                    "kendall_tau": -1.0, "models": 3}
    assert "above every other" in v["summary"] and "size alone would pick C" in v["summary"]


def test_not_confident_when_a_model_overlaps_the_top() -> None:
    rng = np.random.default_rng(1)
    shared = rng.normal(0, 1, 400)
    reps = {"a": shared + rng.normal(0, 1, 400), "b": shared + rng.normal(0, 1, 400), "c": shared - 10}
    scores = {"a": {"logme": 0.1}, "b": {"logme": 0.0}, "c": {"logme": -10.0}}
    v = ranking_verdict(["a", "b", "c"], NAMES, "logme", reps, scores, prior=0.05, parameters={}, rows=40)
    assert not v["confident"] and v["indistinguishable_from_top"] == ["b"]
    assert v["below_prior"] == ["b", "c"]
    assert v["static_baseline"] == {"by": "parameters", "available": False}
    assert "1 other model(s) cannot be told apart" in v["summary"] and "40 rows" in v["summary"]


def test_saturated_estimators_are_named() -> None:
    scores = {"a": {"hscore": 2.0, "sfda": 1.0, "logme": 0.3}, "b": {"hscore": 2.0 + 1e-12, "sfda": 0.99,
                                                                       "logme": 0.2},
              "c": {"hscore": 2.0, "sfda": 1.0, "logme": None}}
    assert degenerate_estimators(scores, ["hscore", "sfda", "logme"]) == ["hscore", "sfda"]


def test_no_bootstrap_is_never_confident() -> None:
    scores = {"a": {"logme": 1.0}, "b": {"logme": 0.0}}
    v = ranking_verdict(["a", "b"], NAMES, "logme", None, scores, prior=None, parameters={}, rows=10)
    assert not v["confident"] and v["indistinguishable_from_top"] == ["b"]


def test_static_baseline_agreeing_order() -> None:
    assert static_baseline(["c", "b", "a"], {"a": 1, "b": 2, "c": 3})["kendall_tau"] == 1.0


def test_models_known_to_be_behind_count_as_distinguished() -> None:
    rng = np.random.default_rng(2)
    reps = {"a": 5 + rng.normal(0, 0.1, 200), "b": rng.normal(0, 0.1, 200)}
    scores = {"a": {"logme": 5.0}, "b": {"logme": 0.0}, "c": {"logme": -1.0}}
    v = ranking_verdict(["a", "b", "c"], NAMES, "logme", reps, scores, None, {}, 50, behind={"c": 0.99})
    assert v["confident"] and v["p_top_beats"]["c"] == 0.99
    v = ranking_verdict(["a", "b", "c"], NAMES, "logme", reps, scores, None, {}, 50, behind={"c": 0.6})
    assert v["indistinguishable_from_top"] == ["c"]

