"""The tune phase: pick the models from the job's ranking, train each (resuming from saved state after a crash),
and return the checkpoints and the tuning summary for the runner to record.

Files only: checkpoints under job_dir/checkpoints/<name>, each model's result under job_dir/results/<name>.json (a
model finished before a crash is not trained again), training states under job_dir/train-state/<name>.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from service.contract import TuneConfig
from workers import pipeline
from workers.phases.inputs import RankedCandidate, TuneInput
from workers.tuning.checkpoint import list_files, write_json_atomic
from workers.tuning.data import ExampleDataset
from workers.tuning.selection import TRADEOFF_CEILING, choose_tradeoff, extension_steps, split_rows, tradeoff_grid


@dataclass(frozen=True)
class CheckpointRecord:
    name: str
    model_id: str
    path: Path
    files: list[dict[str, Any]]  # workers.tuning.checkpoint.list_files


@dataclass
class TuneOutcome:
    checkpoints: list[CheckpointRecord]
    tuning: dict[str, Any]  # the job's tuning summary: {"strategy", "models": [one summary per tuned model]}


@dataclass
class _Split:
    train: ExampleDataset
    val: ExampleDataset
    train_rows: np.ndarray  # the training rows' indices among all the dataset's examples


@dataclass
class _BTuning:
    """B-Tuning's teacher fitted on the whole training split, and how to fit it on some of its rows (trials)."""

    teacher: Any
    fit_on: Callable[[np.ndarray], Any]


def checkpoint_name(model_name: str, strategy: str, regularizer: str, peft: dict[str, Any] | None = None,
                    head: str = "linear") -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", model_name).strip("-") or "model"
    return (f"{safe}-{strategy}" + (f"-{regularizer}" if strategy == "finetune" and regularizer != "none" else "")
            + (f"-{peft['method']}" if peft else "") + (f"-{head}" if head != "linear" else ""))


def ood_examples(job: TuneInput, val_rows: int) -> list[Any] | None:
    """The rows of the job's out-of-distribution dataset, at most as many as the validation rows (a sample drawn
    with the job's seed): the AUROC then weighs both sides alike, and costs no more than a validation pass."""
    if job.ood is None:
        return None
    examples, _ = pipeline.load_dataset(job.ood)
    if len(examples) > max(val_rows, 1):
        keep = np.sort(np.random.default_rng(job.spec["seed"]).choice(len(examples), max(val_rows, 1),
                                                                      replace=False))
        examples = [examples[i] for i in keep]
    return list(examples)


@dataclass
class TunePlan:
    """What every target of a tune job is trained from: the split, B-Tuning's teacher, the targets in order."""

    by_id: dict[str, RankedCandidate]
    split: _Split
    btuning: _BTuning | None
    target_ids: list[str]
    ood: list[Any] | None  # out-of-distribution rows each tuned model's ood_auroc is measured on


def plan_tune(job: TuneInput, progress: pipeline.Progress) -> TunePlan:
    """The job's targets: the ranking's top_k (or the given target) for fine-tuning, the given target or the best
    by LogME for B-Tuning, whose teachers are the top_k by LogME. The split is seeded: every worker plans alike."""
    spec = job.spec
    ranked = usable_ranking(job)
    by_id = {candidate.model.id: candidate for candidate in ranked}
    examples, labels = pipeline.load_dataset(job.dataset.spec)
    train_idx, val_idx = split_rows(labels, job.dataset.spec.task, spec["validation_fraction"], spec["seed"])
    split = _Split(ExampleDataset([examples[i] for i in train_idx], labels[train_idx]),
                   ExampleDataset([examples[i] for i in val_idx], labels[val_idx]), train_idx)
    btuning = None
    if spec["strategy"] == "btuning":
        target_ids, btuning = _btuning_teacher(job, ranked, by_id, examples, split, progress)
    else:
        target_ids = [spec["target"]] if spec["target"] else [c.model.id for c in ranked[:spec["top_k"]]]
    return TunePlan(by_id, split, btuning, target_ids, ood_examples(job, len(val_idx)))


def tune_target(job: TuneInput, plan: TunePlan, model_id: str, position: tuple[int, int],
                progress: pipeline.Progress) -> tuple[str, dict[str, Any]]:
    """Train one of the plan's targets (position: its index and the number of targets); (checkpoint name, its
    summary). Its checkpoint is job.job_dir/checkpoints/<name> (checkpoint_record)."""
    return _tune_model(job, plan.by_id[model_id], position, plan.split, plan.btuning, progress, plan.ood)


def checkpoint_record(job: TuneInput, name: str, summary: dict[str, Any]) -> CheckpointRecord:
    folder = job.job_dir / "checkpoints" / name
    return CheckpointRecord(name, summary["model_id"], folder, list_files(folder))


def run_tune(job: TuneInput, progress: pipeline.Progress) -> TuneOutcome:
    """Tune the job's targets one after another (plan_tune); the service fans several fine-tuning targets out
    over workers instead (tune_target each)."""
    plan = plan_tune(job, progress)
    results: dict[str, dict[str, Any]] = {}
    for index, model_id in enumerate(plan.target_ids):
        name, summary = tune_target(job, plan, model_id, (index, len(plan.target_ids)), progress)
        results[name] = summary
    progress("recording checkpoints", 0.99)
    checkpoints = [checkpoint_record(job, name, summary) for name, summary in results.items()]
    return TuneOutcome(checkpoints, {"strategy": job.spec["strategy"], "models": list(results.values())})


def usable_ranking(job: TuneInput) -> list[RankedCandidate]:
    """The ranking without the candidates that could not be run while ranking (they are not tuned either)."""
    failed = {c.model.id: c.error for c in job.ranking if c.error}
    ranked = [c for c in job.ranking if c.model.id not in failed]
    if not ranked:
        raise ValueError("the job has no ranking to tune from")
    target = job.spec.get("target")
    if target in failed:
        raise ValueError(f"the tuning target could not be run while ranking: {failed[target]}")
    return ranked


def _btuning_teacher(job: TuneInput, ranked: list[RankedCandidate], by_id: dict[str, RankedCandidate],
                     examples: pipeline.Examples, split: _Split, progress: pipeline.Progress
                     ) -> tuple[list[str], _BTuning]:
    """B-Tuning's target (given, or the best by LogME) and the teacher of the top_k by LogME, fitted on the
    training split's features."""
    from workers.tuning.btuning import fit_teacher

    spec, task = job.spec, job.dataset.spec.task
    by_logme = sorted(ranked, key=lambda c: -(c.scores.get("logme") or -np.inf))
    target_id = spec["target"] or by_logme[0].model.id
    teachers = [c.model for c in by_logme[:spec["top_k"]]]
    needed = {m.id: m for m in [*teachers, by_id[target_id].model]}
    features = _train_features(job, list(needed.values()), examples, split.train_rows, progress)
    classes = len(job.dataset.spec.label_names or []) if task == "classification" else None

    def fit_on(rows: np.ndarray) -> Any:
        # the targets as ranking scores them (regression standardised, multi-label labels that occur), so
        # every model's posterior means predict the same thing: teachers' predictions and the student's compare
        return fit_teacher([features[m.id][rows] for m in teachers], features[target_id][rows],
                           pipeline.ranking_targets(split.train.labels[rows], task), task,
                           num_classes=classes, temperature=spec["temperature"], names=[m.name for m in teachers],
                           pooling=job.pooling)

    rows = len(split.train_rows)
    try:
        teacher = fit_on(np.arange(rows))
    except pipeline.UnscorableTargets as exc:
        raise ValueError(f"B-Tuning cannot fit its teachers on the {rows} training rows ({exc}); "
                         "use more rows, another seed or validation_fraction, or strategy finetune") from exc
    return [target_id], _BTuning(teacher, fit_on)


def _train_features(job: TuneInput, models: list[pipeline.ModelSpec], examples: pipeline.Examples,
                    train_rows: np.ndarray, progress: pipeline.Progress) -> dict[str, np.ndarray]:
    """Each model's features of the training rows (float64), from the feature cache when ranking saw them."""
    cache_tag = pipeline.examples_digest(examples)
    settings = job.features
    out: dict[str, np.ndarray] = {}
    for model in models:
        progress(f"teacher features: {model.name}", 0.0)
        result, _ = pipeline.model_features(
            model, examples, cache_tag, cache_root=settings.cache_root, hf_cache_dir=settings.hf_cache_dir,
            max_length=settings.max_length, batch_size=settings.batch_size, device=settings.device,
            pooling=job.pooling)
        out[model.id] = np.asarray(result.features, dtype=np.float64)[train_rows]
    return out


def _tune_model(job: TuneInput, candidate: RankedCandidate, position: tuple[int, int], split: _Split,
                btuning: _BTuning | None, progress: pipeline.Progress, ood: list[Any] | None = None
                ) -> tuple[str, dict[str, Any]]:
    """Train one target (position: its index and the number of targets); (checkpoint name, its summary). `ood`:
    out-of-distribution rows the summary's ood_auroc is measured on."""
    from workers.tuning.loop import train

    spec, model, dataset = job.spec, candidate.model, job.dataset.spec
    name = checkpoint_name(model.name, spec["strategy"], spec["regularizer"]["name"], spec.get("peft"),
                           spec.get("head", "linear"))
    checkpoint_dir = job.job_dir / "checkpoints" / name
    result_path = job.job_dir / "results" / f"{name}.json"
    if checkpoint_dir.is_dir() and result_path.is_file():  # finished before a crash: keep it
        return name, json.loads(result_path.read_text())
    resolved = model.resolve(job.features.hf_cache_dir)
    config, selection, runs = _configure(job, name, model.name, resolved.path, split.train, btuning, progress)
    index, count = position
    stage = f"tuning {index + 1}/{count}: {model.name}"

    def on_progress(point: dict[str, Any]) -> None:
        fraction = (index + (runs - 1 + point["step"] / max(point["total_steps"], 1)) / runs) / count
        progress(stage, min(fraction, 0.99))

    outcome = train(config, resolved.path, split.train, split.val, dataset.task, dataset.label_names,
                    checkpoint_dir=checkpoint_dir, state_dir=job.job_dir / "train-state" / name,
                    on_progress=on_progress, teacher=btuning.teacher if btuning is not None else None,
                    card=_card(job, candidate, selection), ood=ood)
    summary = {"model": model.name, "model_id": model.id, "checkpoint": name, **outcome.to_dict()}
    if selection is not None:
        summary["details"]["tradeoff_selection"] = selection
    write_json_atomic(result_path, summary)
    return name, summary


def _configure(job: TuneInput, name: str, model_name: str, model_dir: Path, train_set: ExampleDataset,
               btuning: _BTuning | None, progress: pipeline.Progress
               ) -> tuple[TuneConfig, dict[str, Any] | None, int]:
    """The run's TuneConfig, with B-Tuning's tradeoff chosen by trial runs when the job leaves it open; (config,
    the choice or None, the runs progress counts: the most trials there can be, and the final run)."""
    spec, dataset = job.spec, job.dataset.spec
    # B-Tuning with a tradeoff to choose ("auto" or a list): one trial run per value, each ~80% of the final
    # run's steps; a number is used as given (finetune ignores it)
    grid = tradeoff_grid(spec["tradeoff"]) if btuning is not None else None
    extend_to = TRADEOFF_CEILING if spec["tradeoff"] == "auto" else None  # a job's own list is tried as given
    fixed = spec["tradeoff"] if isinstance(spec["tradeoff"], (int, float)) else 1.0
    config = TuneConfig.from_spec(spec, tradeoff=fixed, device=job.features.device)  # the worker's device
    # progress counts the most trials there can be (the grid and its extensions); fewer only jump it forward
    most_trials = len(grid) + extension_steps(grid, extend_to) if grid is not None and len(grid) > 1 else 0
    runs = 1 + most_trials
    if grid is None or btuning is None:
        return config, None, runs

    def on_trial(trial: int, value: float, point: dict[str, Any]) -> None:
        fraction = (trial + point["step"] / max(point["total_steps"], 1)) / runs
        progress(f"choosing the B-Tuning tradeoff: {model_name} with {value:g} (trial {trial + 1})",
                 min(fraction, 0.99))

    selection = choose_tradeoff(config, model_dir, train_set, dataset.task, dataset.label_names, btuning.fit_on,
                                grid, job.job_dir / "train-state" / name, on_progress=on_trial, extend_to=extend_to)
    return replace(config, tradeoff=selection["chosen"]).validate(), selection, runs


def _card(job: TuneInput, candidate: RankedCandidate, selection: dict[str, Any] | None) -> dict[str, Any]:
    """What the checkpoint's model card records beyond the run itself: the data, the base model, the job."""
    model = candidate.model
    return {"dataset_sha256": job.dataset.sha256, "dataset_columns": dict(job.dataset.columns),
            # a hub repo id; a folder's path is the server's, which the checkpoint's owner may not see
            "base_model": model.name, "base_model_source": model.source,
            "base_model_locator": model.locator if model.source == "hf" else None,
            "base_model_revision": model.revision, "job_id": job.job_id, "ranking_scores": candidate.scores,
            "tune": job.spec, **({"tradeoff_selection": selection} if selection is not None else {})}
