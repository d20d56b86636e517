"""B-Tuning's tradeoff chosen by validation: trials on the training split only, the best held-out one wins, the
choice is kept for a restarted worker, and the API takes a number, a list or "auto" with one clear error."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.tiny_models import make_tiny_bert
from tests.unit.test_tuning import NAMES, TRAIN, config
from workers.tuning import loop
from workers.tuning.btuning import BTuningTeacher
from workers.tuning.selection import (
    SELECTION_FILE,
    TRADEOFF_CEILING,
    TRADEOFF_GRID,
    best_trial,
    choose_tradeoff,
    extension_steps,
    split_rows,
    tradeoff_grid,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert")


def misleading_teacher(rows: np.ndarray, seen: list[np.ndarray] | None = None) -> BTuningTeacher:
    """A teacher whose prediction is the wrong class: distilling it hard stops the student learning the task."""
    if seen is not None:
        seen.append(np.asarray(rows))
    rng = np.random.default_rng(0)
    flipped = np.eye(2)[1 - np.asarray(TRAIN.labels)[rows]]
    features = flipped @ rng.normal(size=(2, 8))
    readout = np.linalg.lstsq(features, flipped, rcond=None)[0].T
    return BTuningTeacher([features], [readout], scores=[0.0], student_weights=rng.normal(size=(2, 32)))


def test_grid_forms() -> None:
    assert tradeoff_grid("auto") == list(TRADEOFF_GRID)
    assert tradeoff_grid([1, 0.1, 1.0]) == [0.1, 1.0]
    assert tradeoff_grid(0.5) is None


def test_best_trial_by_held_out_loss_then_the_tasks_metric_then_the_smaller_tradeoff() -> None:
    trials = [{"tradeoff": 0.1, "accuracy": 0.8, "val_loss": 0.5}, {"tradeoff": 1.0, "accuracy": 0.9, "val_loss": 0.7},
              {"tradeoff": 10.0, "accuracy": 0.9, "val_loss": 0.6}]
    assert best_trial(trials, "classification")["tradeoff"] == 0.1  # the loss decides, not the coarse accuracy
    same_loss = [{"tradeoff": 0.1, "accuracy": 0.8, "val_loss": 0.6},
                 {"tradeoff": 1.0, "accuracy": 0.9, "val_loss": 0.6}]
    assert best_trial(same_loss, "classification")["tradeoff"] == 1.0
    tied = [{"tradeoff": 1.0, "accuracy": 0.9, "val_loss": 0.6}, {"tradeoff": 0.1, "accuracy": 0.9, "val_loss": 0.6}]
    assert best_trial(tied, "classification")["tradeoff"] == 0.1
    regression = [{"tradeoff": 0.1, "rmse": 2.0, "val_loss": 4.0}, {"tradeoff": 1.0, "rmse": 2.0, "val_loss": 4.0},
                  {"tradeoff": 10.0, "rmse": 1.5, "val_loss": 4.0}]
    assert best_trial(regression, "regression")["tradeoff"] == 10.0  # lower RMSE is better
    diverged = [{"tradeoff": 10.0, "micro_f1": math.nan, "val_loss": math.nan},
                {"tradeoff": 0.1, "micro_f1": 0.2, "val_loss": 0.9}]
    assert best_trial(diverged, "multilabel")["tradeoff"] == 0.1


def test_trials_use_the_training_split_only_and_the_best_held_out_tradeoff_wins(bert_dir, tmp_path, monkeypatch):
    calls: list[dict] = []
    real_train = loop.train

    def spy(cfg, model_dir, train_set, val_set, *args, **kwargs):
        calls.append({"tradeoff": cfg.tradeoff, "train": list(train_set.examples), "val": list(val_set.examples),
                      "checkpoint_dir": kwargs.get("checkpoint_dir")})
        return real_train(cfg, model_dir, train_set, val_set, *args, **kwargs)

    monkeypatch.setattr(loop, "train", spy)
    seen: list[np.ndarray] = []
    points: list[tuple[int, int]] = []
    selection = choose_tradeoff(config(strategy="btuning"), bert_dir, TRAIN, "classification", NAMES,
                                lambda rows: misleading_teacher(rows, seen), [1000.0, 0.0], tmp_path,
                                on_progress=lambda trial, value, point: points.append((trial, point["step"])))
    fit_rows, held_rows = split_rows(np.asarray(TRAIN.labels), "classification", 0.2, seed=0)
    # the teacher is fitted on the trials' training rows only, and each trial holds the other rows out
    assert len(seen) == 1 and np.array_equal(seen[0], fit_rows)
    assert [c["tradeoff"] for c in calls] == [0.0, 1000.0]
    for call in calls:
        assert call["train"] == [TRAIN.examples[i] for i in fit_rows]
        assert call["val"] == [TRAIN.examples[i] for i in held_rows]
        assert call["checkpoint_dir"] is None  # nothing written for a trial
    assert selection["rows"] == {"train": len(fit_rows), "validation": len(held_rows)}
    assert {p[0] for p in points} == {0, 1}
    by_value = {t["tradeoff"]: t for t in selection["trials"]}
    # plain fine-tuning learns this separable task; a misleading teacher at weight 1000 holds it at chance
    assert by_value[0.0]["accuracy"] > by_value[1000.0]["accuracy"] + 0.3, selection
    assert selection["chosen"] == 0.0 and selection["metric"] == "accuracy"
    assert not list(tmp_path.glob("**/model.safetensors"))

    # a restarted worker reads the choice back instead of training the trials again
    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("trials ran again"))
    again = choose_tradeoff(config(strategy="btuning"), bert_dir, TRAIN, "classification", NAMES,
                            misleading_teacher, [0.0, 1000.0], tmp_path)
    assert again == json.loads(json.dumps(selection))
    # other settings are another choice
    monkeypatch.setattr(loop, "train", spy)
    calls.clear()
    choose_tradeoff(config(strategy="btuning", lr=1e-3), bert_dir, TRAIN, "classification", NAMES,
                    misleading_teacher, [0.0, 1000.0], tmp_path)
    assert len(calls) == 2
    assert json.loads((tmp_path / SELECTION_FILE).read_text())["key"]["config"]["lr"] == 1e-3


def test_no_trials_when_nothing_can_be_held_out_or_one_value_is_given(bert_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("no trial should run"))
    one_each = type(TRAIN)(TRAIN.examples[:2], np.asarray(TRAIN.labels)[:2])  # one example per class
    picked = choose_tradeoff(config(strategy="btuning"), bert_dir, one_each, "classification", NAMES,
                             misleading_teacher, TRADEOFF_GRID, tmp_path / "a")
    assert picked["chosen"] == 1.0 and picked["trials"] == [] and "too small" in picked["reason"]
    single = choose_tradeoff(config(strategy="btuning"), bert_dir, TRAIN, "classification", NAMES,
                             misleading_teacher, [3.0], tmp_path / "b")
    assert single["chosen"] == 3.0 and single["trials"] == []


def test_no_trials_when_the_trials_rows_give_no_teacher(bert_dir, tmp_path, monkeypatch):
    """Multi-label rows whose only positives fall among the held-out rows: LogME has nothing to fit on the trials'
    rows, so the job goes on with the fallback and says why (it failed before)."""
    from workers.pipeline import ranking_targets
    from workers.tuning.btuning import fit_teacher

    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("no trial should run"))
    n = len(TRAIN.examples)
    _, held_rows = split_rows(np.zeros((n, 2)), "multilabel", 0.2, seed=0)  # random rows: labels do not matter
    labels = np.zeros((n, 2))
    labels[held_rows[:2], 0] = labels[held_rows[2:4], 1] = 1
    sparse = type(TRAIN)(TRAIN.examples, labels)
    features = np.random.default_rng(0).normal(size=(n, 8))

    def make_teacher(rows: np.ndarray) -> BTuningTeacher:
        return fit_teacher([features[rows]], features[rows], ranking_targets(labels[rows], "multilabel"),
                           "multilabel")

    picked = choose_tradeoff(config(strategy="btuning"), bert_dir, sparse, "multilabel", NAMES, make_teacher,
                             TRADEOFF_GRID, tmp_path)
    assert picked["chosen"] == 1.0 and picked["trials"] == []
    assert "no teacher" in picked["reason"] and "no label occurs" in picked["reason"]
    make_teacher(np.arange(n))  # the whole split has labels: the final run's teacher is fine


@pytest.mark.parametrize("best, tried, chosen", [
    (1.0, [0.01, 0.1, 1.0, 10.0], 1.0),  # an inner best: the grid only
    (100.0, [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0], 100.0),  # the top wins, then 100, then 1000 does not
    (1e6, [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0], 1000.0),  # up to the ceiling and no further
])
def test_auto_goes_on_upwards_while_the_largest_value_tried_is_the_best(best, tried, chosen, bert_dir, tmp_path,
                                                                        monkeypatch):
    """The held-out loss here is |log10(tradeoff / best)|: the search extends the grid a decade at a time while its
    top value wins, to TRADEOFF_CEILING; a job's own list (extend_to None) is tried as given."""
    calls: list[float] = []

    def fake_train(cfg, *args, **kwargs):
        calls.append(cfg.tradeoff)
        loss = abs(math.log10(cfg.tradeoff / best))
        return loop.TuneResult(task="classification", metrics={"val_loss": loss, "accuracy": 0.5}, curve=[],
                               wall_seconds=0.0, steps=1, total_steps=1, resumed_from_step=0, checkpoint_dir="",
                               config=cfg.to_dict())

    monkeypatch.setattr(loop, "train", fake_train)
    points: list[tuple[int, float]] = []
    selection = choose_tradeoff(config(strategy="btuning"), bert_dir, TRAIN, "classification", NAMES,
                                misleading_teacher, TRADEOFF_GRID, tmp_path / "auto", extend_to=TRADEOFF_CEILING,
                                on_progress=lambda trial, value, point: points.append((trial, value)))
    assert calls == tried and selection["chosen"] == chosen
    assert selection["extended"] == tried[len(TRADEOFF_GRID):] and [t["tradeoff"] for t in selection["trials"]] == tried
    assert extension_steps(TRADEOFF_GRID, TRADEOFF_CEILING) == 2 and extension_steps(TRADEOFF_GRID, None) == 0
    calls.clear()
    listed = choose_tradeoff(config(strategy="btuning"), bert_dir, TRAIN, "classification", NAMES,
                             misleading_teacher, TRADEOFF_GRID, tmp_path / "listed")
    assert calls == list(TRADEOFF_GRID) and listed["extended"] == []


def test_a_trial_run_writes_nothing(bert_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = loop.train(config(epochs=1), bert_dir, TRAIN, TRAIN, "classification", NAMES, None, None)
    assert result.metrics["accuracy"] is not None and result.checkpoint_dir == ""
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("value, ok", [("auto", True), (0.5, True), ([1, 0.1], True), (-1, False), ([], False),
                                       ("big", False), ([0.1, -2], False), (True, False), (float("nan"), False),
                                       ([0.1] * 9, False)])
def test_the_api_takes_a_number_a_list_or_auto_with_one_message(value, ok) -> None:
    from pydantic import ValidationError

    from service.schemas import TuneSpec

    if ok:
        assert TuneSpec(strategy="btuning", tradeoff=value).tradeoff == value
        return
    with pytest.raises(ValidationError) as info:
        TuneSpec(strategy="btuning", tradeoff=value)
    (error,) = info.value.errors()
    assert error["loc"] == ("tradeoff",) and '"auto"' in error["msg"]
    assert TuneSpec().tradeoff == "auto"


def test_a_worker_killed_while_choosing_reruns_only_the_unfinished_trials(bert_dir, tmp_path, monkeypatch):
    real_train = loop.train
    calls: list[float] = []

    def dies_on_the_second(cfg, *args, **kwargs):
        calls.append(cfg.tradeoff)
        if len(calls) == 2:
            raise RuntimeError("worker killed")
        return real_train(cfg, *args, **kwargs)

    monkeypatch.setattr(loop, "train", dies_on_the_second)
    with pytest.raises(RuntimeError, match="killed"):
        choose_tradeoff(config(strategy="btuning", epochs=1), bert_dir, TRAIN, "classification", NAMES,
                        misleading_teacher, [0.0, 1000.0], tmp_path)
    kept = json.loads((tmp_path / SELECTION_FILE).read_text())
    assert kept["selection"] is None and [t["tradeoff"] for t in kept["trials"]] == [0.0]

    def counted(cfg, *args, **kwargs):
        calls.append(cfg.tradeoff)
        return real_train(cfg, *args, **kwargs)

    calls.clear()
    monkeypatch.setattr(loop, "train", counted)
    selection = choose_tradeoff(config(strategy="btuning", epochs=1), bert_dir, TRAIN, "classification", NAMES,
                                misleading_teacher, [0.0, 1000.0], tmp_path)
    assert calls == [1000.0] and [t["tradeoff"] for t in selection["trials"]] == [0.0, 1000.0]
