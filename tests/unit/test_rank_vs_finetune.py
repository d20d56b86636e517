"""The pieces of benchmarks/rank_vs_finetune.py that turn scores into claims: agreement statistics and the probe."""

import numpy as np
import pytest

from benchmarks.rank_vs_finetune import agreement, linear_probe, subsample


def test_agreement_of_the_same_order_is_perfect_and_of_the_reverse_is_not():
    truth = [0.9, 0.7, 0.8, 0.5, 0.6]
    same = agreement([5.0, 1.0, 3.0, -2.0, 0.0], truth)
    assert same["weightedtau"] == pytest.approx(1.0) and same["kendall"] == pytest.approx(1.0)
    assert same["rel1"] == 1.0 and same["top1"] == 1.0
    reverse = agreement([-t for t in truth], truth)
    assert reverse["weightedtau"] == pytest.approx(-1.0)
    assert reverse["rel1"] == pytest.approx(0.5 / 0.9) and reverse["top1"] == 0.0
    # scores that cannot tell models apart claim nothing, not a lucky top-1
    assert agreement([4.0, 4.0, 4.0, 4.0, 4.0], truth) == {"weightedtau": None, "pearson": None, "kendall": None,
                                                          "rel1": None, "top1": None}


def test_linear_probe_separates_separable_classes_and_not_noise():
    rng = np.random.default_rng(0)
    y = np.arange(200) % 4
    signal = np.eye(4)[y] @ rng.normal(size=(4, 16)) * 3 + rng.normal(size=(200, 16))
    acc, _ = linear_probe("classification", signal[:100], y[:100], signal[100:], y[100:])
    assert acc > 0.95
    noise = rng.normal(size=(200, 16))
    acc_noise, _ = linear_probe("classification", noise[:100], y[:100], noise[100:], y[100:])
    assert acc_noise < 0.45
    x = rng.normal(size=(200, 8))
    target = (x @ rng.normal(size=8) + 0.1 * rng.normal(size=200)).astype(np.float32)
    r2, _ = linear_probe("regression", x[:100], target[:100], x[100:], target[100:])
    assert r2 > 0.95


def test_subsample_is_stratified_and_keeps_every_class():
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    picked = subsample(labels, "classification", 100, seed=0)
    counts = np.bincount(labels[picked], minlength=3)
    assert counts[0] == 90 and counts[1] == 9 and counts[2] == 2
    assert len(np.unique(picked)) == len(picked)


@pytest.mark.parametrize("task", ["classification", "multilabel", "regression"])
def test_the_script_runs_end_to_end_for_every_task_and_rescores_without_refitting(task, tmp_path):
    """'Works for any dataset a user uploads': a JSONL of each task through main(), two tiny models, one seed; then
    --rescore recomputes the estimator scores and keeps the fine-tuning runs."""
    import json

    from benchmarks.rank_vs_finetune import main
    from tests.tiny_models import make_tiny_bert

    hub = tmp_path / "hub"
    make_tiny_bert(hub / "tiny-a", hidden_size=32, num_layers=1, seed=0)
    make_tiny_bert(hub / "tiny-b", hidden_size=16, num_layers=1, seed=1)
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    rows = []
    for i in range(60):
        text = " ".join(rng.choice(words, size=6)) + f" item {i}"
        label = {"classification": words[i % 3], "multilabel": [words[i % 3], words[3 + i % 2]],
                 "regression": float(i % 7) + 0.5}[task]
        rows.append({"body": text, "target": label})
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    args = ["--hub", str(hub), "--data", str(data), "--task", task, "--text-column", "body", "--label-column",
            "target", "--rows", "0", "--seeds", "0", "--epochs", "1", "--max-length", "16", "--metrics",
            "logme,ridge_loo", "--out", str(tmp_path / "out.md")]
    assert main(args) == 0
    stored = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert set(stored["scores"]) == {"tiny-a", "tiny-b"} and set(stored["finetune"]) == {"tiny-a/0", "tiny-b/0"}
    for row in stored["scores"].values():
        assert row["scores"]["logme"] is not None and row["scores"]["ridge_loo"] is not None
    report = (tmp_path / "out.md").read_text(encoding="utf-8")
    assert "| ridge_loo |" in report and "| logme |" in report
    runs = stored["finetune"]
    assert main(args + ["--rescore"]) == 0
    again = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert again["finetune"] == runs and again["meta"]["rescored_by"].endswith("--rescore")
    # a store made for another split is refused, not silently started over (that would re-run every fine-tuning)
    other = [("30" if a == "0" and args[i - 1] == "--rows" else a) for i, a in enumerate(args)]
    with pytest.raises(SystemExit):
        main(other + ["--rescore"])
    assert json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))["finetune"] == runs


def test_best_of_learning_rates_takes_each_models_best_and_refuses_other_splits(tmp_path):
    from benchmarks.rank_vs_finetune import best_of_lrs_report

    def store(lr, quality, split="s1"):
        settings = {"task": "classification", "epochs": 3, "lr": lr, "rows": 400}
        return {"key": [split, settings],
                "meta": {"task": "classification", "models": ["a", "b", "c"], "metrics": ["logme"]},
                "scores": {m: {"model": m, "scores": {"logme": score}, "linear_probe": score}
                           for m, score in (("a", 3.0), ("b", 2.0), ("c", 1.0))},
                "finetune": {f"{m}/{seed}": {"model": m, "quality": q + 0.001 * seed}
                             for m, q in quality.items() for seed in (0, 1)}}

    low = store(5e-5, {"a": 0.60, "b": 0.80, "c": 0.50})  # a trains badly at the low lr: LogME looks wrong
    high = store(2e-4, {"a": 0.90, "b": 0.70, "c": 0.40})
    lines = best_of_lrs_report([low, high])
    text = "\n".join(lines)
    assert "| a | 0.601 | 0.901 | 0.901 |" in text  # each model's best mean over the learning rates
    assert "| logme | 1.000 |" in text and "Best-lr fine-tuned order: a > b > c." in text
    with pytest.raises(SystemExit):
        best_of_lrs_report([low, store(2e-4, {"a": 0.9, "b": 0.7, "c": 0.4}, split="s2")])
