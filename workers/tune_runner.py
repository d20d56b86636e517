"""The tune phase of a job: pick the models from its ranking, train each (resuming from saved state after a crash),
record metrics and checkpoints in one transaction."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.orm import sessionmaker

from service import jobs as job_states
from service.contract import JobStatus, TuneConfig
from service.db import Checkpoint, Dataset, HubModel, Job, RankingEntry, utcnow
from service.settings import Settings
from workers.tuning.checkpoint import list_files, write_json_atomic
from workers.tuning.selection import TRADEOFF_CEILING, choose_tradeoff, extension_steps, split_rows, tradeoff_grid


def checkpoint_name(model_name: str, strategy: str, regularizer: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", model_name).strip("-") or "model"
    return f"{safe}-{strategy}" + (f"-{regularizer}" if strategy == "finetune" and regularizer != "none" else "")


def run_tuning(sessions: sessionmaker, job: Job, dataset: Dataset, token: str, progress: Any,
               settings: Settings) -> None:
    from workers import pipeline
    from workers.hub import resolve_model
    from workers.runner import feature_batch_size
    from workers.tuning import TextDataset, TuningCancelled, train
    from workers.tuning.btuning import fit_teacher

    spec = job.tune or {}
    with sessions() as session:
        rows = session.execute(select(RankingEntry, HubModel).join(HubModel, HubModel.id == RankingEntry.model_id)
                               .where(RankingEntry.job_id == job.id).order_by(RankingEntry.rank)).all()
    # candidates that could not be run during ranking (details["error"]) are not tuned either
    failed = {model.id: (entry.details or {})["error"] for entry, model in rows if (entry.details or {}).get("error")}
    ranked = [model for _, model in rows if model.id not in failed]
    scores = {model.id: entry.scores for entry, model in rows}
    if not ranked:
        raise ValueError("the job has no ranking to tune from")
    if spec.get("target") in failed:
        raise ValueError(f"the tuning target could not be run while ranking: {failed[spec['target']]}")
    by_id = {m.id: m for m in ranked}
    strategy, top_k = spec["strategy"], spec["top_k"]
    regularizer = spec["regularizer"]["name"]

    dataset_spec = pipeline.DatasetSpec(Path(dataset.storage_path), dataset.task, dataset.label_names)
    texts, labels = pipeline.load_dataset(dataset_spec)
    train_idx, val_idx = split_rows(labels, dataset.task, spec["validation_fraction"], spec["seed"])
    train_set = TextDataset([texts[i] for i in train_idx], labels[train_idx])
    val_set = TextDataset([texts[i] for i in val_idx], labels[val_idx])

    teacher = None
    make_teacher: Callable[[np.ndarray], Any] | None = None  # B-Tuning: the teacher fitted on given training rows
    if strategy == "btuning":
        by_logme = sorted(ranked, key=lambda m: -(scores[m.id].get("logme") or -np.inf))
        target_ids = [spec["target"] or by_logme[0].id]
        teachers = by_logme[:top_k]
        needed = {m.id: m for m in [*teachers, by_id[target_ids[0]]]}
        train_features: dict[str, np.ndarray] = {}
        cache_tag = pipeline.examples_digest(texts)
        for model in needed.values():
            progress(f"teacher features: {model.name}", 0.0)
            result, _ = pipeline.model_features(
                pipeline.ModelSpec(model.id, model.name, model.source, model.locator, model.revision), texts,
                cache_tag, cache_root=settings.features_dir, hf_cache_dir=settings.hf_cache_dir,
                max_length=settings.feature_max_length, batch_size=feature_batch_size(settings),
                device=settings.device, pooling=job.options.get("pooling", "mean"))
            train_features[model.id] = np.asarray(result.features, dtype=np.float64)[train_idx]
        classes = len(dataset.label_names or []) if dataset.task == "classification" else None

        def fit_on(rows: np.ndarray) -> Any:
            # the targets as ranking scores them (regression standardised, multi-label labels that occur), so
            # every model's posterior means predict the same thing: teachers' predictions and the student's compare
            return fit_teacher([train_features[m.id][rows] for m in teachers], train_features[target_ids[0]][rows],
                               pipeline.ranking_targets(train_set.labels[rows], dataset.task), dataset.task,
                               num_classes=classes, temperature=spec["temperature"], names=[m.name for m in teachers],
                               pooling=job.options.get("pooling", "mean"))

        make_teacher = fit_on
        try:
            teacher = fit_on(np.arange(len(train_idx)))
        except pipeline.UnscorableTargets as exc:
            raise ValueError(f"B-Tuning cannot fit its teachers on the {len(train_idx)} training rows ({exc}); "
                             "use more rows, another seed or validation_fraction, or strategy finetune") from exc
    else:
        target_ids = [spec["target"]] if spec["target"] else [m.id for m in ranked[:top_k]]

    job_dir = settings.jobs_dir / job.id
    results: dict[str, Any] = {}
    for index, model_id in enumerate(target_ids):
        model = by_id[model_id]
        name = checkpoint_name(model.name, strategy, regularizer)
        checkpoint_dir = job_dir / "checkpoints" / name
        result_path = job_dir / "results" / f"{name}.json"
        if checkpoint_dir.is_dir() and result_path.is_file():  # finished before a crash: keep it
            results[name] = json.loads(result_path.read_text())
            continue
        resolved = resolve_model(model.source, repo_id=model.locator if model.source == "hf" else None,
                                 revision=model.revision if model.source == "hf" else None,
                                 path=model.locator if model.source == "local" else None,
                                 cache_dir=settings.hf_cache_dir)
        # B-Tuning with a tradeoff to choose ("auto" or a list): one trial run per value, each ~80% of the final
        # run's steps; a number is used as given (finetune ignores it)
        grid = tradeoff_grid(spec["tradeoff"]) if make_teacher is not None else None
        extend_to = TRADEOFF_CEILING if spec["tradeoff"] == "auto" else None  # a job's own list is tried as given
        fixed = spec["tradeoff"] if isinstance(spec["tradeoff"], (int, float)) else 1.0
        config = TuneConfig.from_spec(spec, tradeoff=fixed, device=settings.device)
        # progress counts the most trials there can be (the grid and its extensions); fewer only jump it forward
        most_trials = len(grid) + extension_steps(grid, extend_to) if grid is not None and len(grid) > 1 else 0
        runs = 1 + most_trials
        selection = None
        if grid is not None and make_teacher is not None:
            def on_trial(trial: int, value: float, point: dict[str, Any], name: str = model.name) -> None:
                fraction = (trial + point["step"] / max(point["total_steps"], 1)) / runs
                progress(f"choosing the B-Tuning tradeoff: {name} with {value:g} (trial {trial + 1})",
                         min(fraction, 0.99))

            selection = choose_tradeoff(config, resolved.path, train_set, dataset.task, dataset.label_names,
                                        make_teacher, grid, job_dir / "train-state" / name, on_progress=on_trial,
                                        extend_to=extend_to)
            config = replace(config, tradeoff=selection["chosen"]).validate()
        stage = f"tuning {index + 1}/{len(target_ids)}: {model.name}"

        def on_progress(point: dict[str, Any], stage: str = stage, index: int = index, runs: int = runs) -> None:
            fraction = (index + (runs - 1 + point["step"] / max(point["total_steps"], 1)) / runs) / len(target_ids)
            progress(stage, min(fraction, 0.99))

        # the columns say what the checkpoint reads: a text, a pair for tokenizer(text, text_pair), or images
        columns = {"text": dataset.text_column, "text_pair": dataset.text_pair_column, "image": dataset.image_column,
                   "label": dataset.label_column}
        card = {"dataset_sha256": dataset.sha256,
                "dataset_columns": {k: v for k, v in columns.items() if v is not None},
                "base_model": model.name, "base_model_source": model.source,
                "base_model_locator": model.locator, "base_model_revision": model.revision, "job_id": job.id,
                "ranking_scores": scores.get(model.id), "tune": spec,
                **({"tradeoff_selection": selection} if selection is not None else {})}
        try:
            outcome = train(config, resolved.path, train_set, val_set, dataset.task, dataset.label_names,
                            checkpoint_dir=checkpoint_dir, state_dir=job_dir / "train-state" / name,
                            on_progress=on_progress, teacher=teacher, card=card)
        except TuningCancelled as exc:
            raise job_states.JobCancelled(job.id) from exc
        summary = {"model": model.name, "model_id": model.id, "checkpoint": name, **outcome.to_dict()}
        if selection is not None:
            summary["details"]["tradeoff_selection"] = selection
        write_json_atomic(result_path, summary)
        results[name] = summary

    progress("recording checkpoints", 0.99)
    with sessions.begin() as session:
        session.execute(delete(Checkpoint).where(Checkpoint.job_id == job.id))
        for name, summary in results.items():
            folder = job_dir / "checkpoints" / name
            session.add(Checkpoint(job_id=job.id, name=name, model_id=summary["model_id"], path=str(folder),
                                   files=list_files(folder)))
        job_states.finish(session, job.id, token, status=JobStatus.SUCCEEDED, stage="done", progress=1.0,
                          tuning={"strategy": strategy, "models": list(results.values())}, finished_at=utcnow())
