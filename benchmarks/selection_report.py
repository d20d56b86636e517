"""Tables of the model-selection suite (benchmarks.model_selection): every ranking against every ground truth.

A *ranking* is one way to order the candidates from what a rank job sees: an estimator at a layer choice
('logme@last', 'ridge_loo@all'), a documented combination of two (their mean rank, 'mean_rank(a+b)'), a trained
linear probe's cross-validated quality on the sample ('linear_probe_cv@...', a baseline: it is what a user could
compute instead), or a static order that ignores the data ('params': parameter count, 'width': feature width).
A ranking that cannot tell the models apart on a sample (the same score for all: a saturated estimator) is counted
as a random order on that sample.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np

METRICS = ("weightedtau", "kendall", "pearson", "rel1", "rel3")
STATIC = ("params", "width")
# Combinations declared before measuring: LogME with the estimator that fixes its few-rows failure, each way.
COMBINATIONS = (("logme", "ridge_loo"), ("logme_projected", "ridge_loo"), ("logme", "logme_projected"))
QUALITY = {"classification": "accuracy", "multilabel": "micro-F1", "regression": "R²"}


def agreement(scores: list[float], truth: list[float]) -> dict[str, float] | None:
    """Weighted τ (scipy, hyperbolic weights favouring the top), Kendall τ, Pearson r, Rel@1 and Rel@3 (the best
    truth among the ranking's top 1 / top 3 over the best truth); None when the scores cannot rank."""
    from scipy import stats

    s, t = np.asarray(scores, float), np.asarray(truth, float)
    if len(s) < 2 or np.ptp(s) <= 1e-9 * max(1.0, float(np.abs(s).max())) or np.ptp(t) == 0:
        return None
    order = np.argsort(-s, kind="stable")
    best = float(t.max())
    return {"weightedtau": float(stats.weightedtau(s, t).statistic),
            "kendall": float(stats.kendalltau(s, t).statistic),
            "pearson": float(stats.pearsonr(s, t).statistic),
            "rel1": float(t[order[0]]) / best if best > 0 else math.nan,
            "rel3": float(t[order[:3]].max()) / best if best > 0 else math.nan}


def random_order(truth: list[float], draws: int = 2000, seed: int = 0) -> dict[str, float]:
    """The expected agreement of a uniformly random order: weighted τ by Monte Carlo, the rest exactly."""
    from scipy import stats

    t = np.asarray(truth, float)
    n, best = len(t), float(t.max())
    rng = np.random.default_rng(seed)
    wt = [stats.weightedtau(rng.permutation(n).astype(float), t).statistic for _ in range(draws)]
    ranked = np.sort(t)  # P(the best of 3 random picks is the i-th smallest) = C(i-1, 2) / C(n, 3)
    k = min(3, n)
    top3 = sum(ranked[i] * math.comb(i, k - 1) for i in range(n)) / math.comb(n, k)
    return {"weightedtau": float(np.mean(wt)), "kendall": 0.0, "pearson": 0.0,
            "rel1": float(t.mean()) / best if best > 0 else math.nan,
            "rel3": float(top3) / best if best > 0 else math.nan}


def truths(store: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Ground truths by model: 'probe' (head-only: the better layer choice) and, where every model has runs,
    'finetune' (best learning rate's mean over seeds)."""
    models = store["meta"]["models"]
    out: dict[str, dict[str, float]] = {}
    probe = store.get("probe_truth", {})
    if all(m in probe for m in models):
        out["probe"] = {m: max(probe[m].values()) for m in models}
    tuned = finetune_table(store)
    if tuned and all(m in tuned for m in models):
        out["finetune"] = {m: tuned[m]["best"] for m in models}
    return out


def finetune_table(store: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per model: mean and std over seeds per learning rate, the best learning rate, the seeds' spread."""
    runs: dict[str, dict[float, list[float]]] = {}
    for run in store.get("finetune", {}).values():
        runs.setdefault(run["model"], {}).setdefault(run["lr"], []).append(run["quality"])
    out = {}
    for model, by_lr in runs.items():
        means = {lr: statistics.fmean(q) for lr, q in by_lr.items()}
        best_lr = max(means, key=means.get)
        out[model] = {"means": means, "best_lr": best_lr, "best": means[best_lr],
                      "std": statistics.stdev(by_lr[best_lr]) if len(by_lr[best_lr]) > 1 else 0.0,
                      "n": len(by_lr[best_lr])}
    return out


def ranking_scores(store: dict[str, Any]) -> dict[tuple[int, int], dict[str, dict[str, float | None]]]:
    """{(rows, draw): {ranking: {model: score}}} for every sample, with the combinations and static orders."""
    models, static = store["meta"]["models"], store.get("static", {})
    out: dict[tuple[int, int], dict[str, dict[str, float | None]]] = {}
    for key, scores in store.get("samples", {}).items():
        model, rows, draw = key.split("|")
        if model not in models:
            continue
        cell = out.setdefault((int(rows), int(draw)), {})
        for name, value in scores.items():
            cell.setdefault(name, {})[model] = value
    for cell in out.values():
        for a, b in COMBINATIONS:
            for layers in ("last", "all"):
                combined = mean_rank([cell.get(f"{a}@{layers}", {}), cell.get(f"{b}@{layers}", {})], models)
                if combined:
                    cell[f"mean_rank({a}+{b})@{layers}"] = combined
        for name in STATIC:
            cell[name] = {m: float(static[m][name]) for m in models if m in static}
    return {k: v for k, v in out.items() if all(len(r) == len(models) for r in v.values() if r)}


def mean_rank(rankings: list[dict[str, float | None]], models: list[str]) -> dict[str, float] | None:
    """Minus the mean of each model's rank (0 = best) under the given scores; None unless all are complete."""
    from scipy.stats import rankdata

    if any(len(r) != len(models) or any(r.get(m) is None for m in models) for r in rankings):
        return None
    ranks = [rankdata([-r[m] for m in models]) for r in rankings]
    return {m: -float(np.mean([rk[i] for rk in ranks])) for i, m in enumerate(models)}


def agreements(store: dict[str, Any], truth_name: str) -> dict[str, dict[int, dict[str, float]]]:
    """{ranking: {rows: mean agreement over draws}}; a sample a ranking cannot order counts as random."""
    truth = truths(store).get(truth_name)
    if truth is None:
        return {}
    models = store["meta"]["models"]
    t = [truth[m] for m in models]
    chance = random_order(t)
    acc: dict[str, dict[int, list[dict[str, float]]]] = {}
    for (rows, _draw), cell in ranking_scores(store).items():
        for name, scores in cell.items():
            if any(scores.get(m) is None for m in models):
                continue  # not applicable to this task
            a = agreement([scores[m] for m in models], t) or chance
            acc.setdefault(name, {}).setdefault(rows, []).append(a)
    out = {name: {rows: {k: float(np.nanmean([a[k] for a in runs])) for k in METRICS}
                  for rows, runs in by_rows.items()} for name, by_rows in acc.items()}
    out["random order (expected)"] = {rows: chance for rows in {r for v in out.values() for r in v}}
    return out


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def model_table(store: dict[str, Any]) -> list[str]:
    meta, static, probe = store["meta"], store.get("static", {}), store.get("probe_truth", {})
    q = QUALITY[meta["task"]]
    tuned = finetune_table(store)
    lines = [f"| model | params | D | feature s | probe {q}, last layer | probe {q}, all layers | fine-tuned {q}: "
             "best lr, mean ± std over seeds | per lr |", "|---|---|---|---|---|---|---|---|"]
    for m in meta["models"]:
        s, p, ft = static.get(m, {}), probe.get(m, {}), tuned.get(m)
        ft_cell = f"{ft['best']:.3f} ± {ft['std']:.3f} (lr {ft['best_lr']:g}, n={ft['n']})" if ft else "not run"
        per_lr = ", ".join(f"{lr:g}: {v:.3f}" for lr, v in sorted(ft["means"].items())) if ft else ""
        lines.append(f"| {m} | {s.get('params', 0) / 1e6:.1f}M | {s.get('width', '')} | "
                     f"{s.get('feature_seconds', 0):.1f} | {fmt(p.get('last'))} | {fmt(p.get('all'))} | {ft_cell} | "
                     f"{per_lr} |")
    return lines


def truth_resolution(store: dict[str, Any]) -> str | None:
    """Whether the head-only truth itself tells its best two models apart: their gap against the standard error of
    a difference of two accuracies on the test split (classification; binomial)."""
    meta = store["meta"]
    probe = truths(store).get("probe")
    if probe is None or meta["task"] != "classification":
        return None
    ranked = sorted(probe.values(), reverse=True)
    n = len(meta["test"])
    se = math.sqrt(sum(q * (1 - q) / n for q in ranked[:2]))
    verdict = ("resolved" if ranked[0] - ranked[1] > 2 * se
               else "not resolved: the top is a tie within the truth's noise")
    return (f"Truth resolution: best − second {ranked[0] - ranked[1]:.3f} against a standard error of the difference "
            f"{se:.3f} ({n} test rows): {verdict}; spread of all models {ranked[0] - ranked[-1]:.3f}.")


def agreement_table(result: dict[str, dict[int, dict[str, float]]]) -> list[str]:
    sizes = sorted({r for v in result.values() for r in v})
    head = " | ".join(f"{k} @{r}" for r in sizes for k in ("wτ", "Kendall", "Pearson", "Rel@1", "Rel@3"))
    lines = [f"| ranking | {head} |", "|---|" + "---|" * (5 * len(sizes))]
    order = sorted(result, key=lambda n: -np.mean([result[n][r]["weightedtau"] for r in result[n]]))
    for name in order:
        cells = " | ".join(fmt(result[name].get(r, {}).get(k)) for r in sizes for k in METRICS)
        lines.append(f"| {name} | {cells} |")
    return lines


def summary(stores: dict[str, dict[str, Any]], sets: list[str], truth_name: str
            ) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Mean agreement per ranking over `sets` (and sample sizes), and its table with per-set weighted τ."""
    per_set = {s: agreements(stores[s], truth_name) for s in sets}
    per_set = {s: r for s, r in per_set.items() if r}
    names = set.intersection(*(set(r) for r in per_set.values())) if per_set else set()
    means: dict[str, dict[str, float]] = {}
    for name in names:
        cells = [per_set[s][name][rows] for s in per_set for rows in per_set[s][name]]
        means[name] = {k: float(np.nanmean([c[k] for c in cells])) for k in METRICS}
        means[name]["set_wt"] = {s: float(np.mean([c["weightedtau"] for c in per_set[s][name].values()]))
                                 for s in per_set}
    cols = list(per_set)
    lines = ["| ranking | mean wτ | Kendall | Pearson | Rel@1 | Rel@3 | " + " | ".join(f"wτ {s}" for s in cols)
             + " |", "|---|---|---|---|---|---|" + "---|" * len(cols)]
    for name in sorted(means, key=lambda n: -means[n]["weightedtau"]):
        m = means[name]
        lines.append(f"| {name} | " + " | ".join(fmt(m[k]) for k in METRICS) + " | "
                     + " | ".join(fmt(m["set_wt"][s]) for s in cols) + " |")
    return lines, means


def chosen(means: dict[str, dict[str, float]], single: bool = False) -> str | None:
    """The estimator ranking (not a baseline) with the best mean weighted τ; single: one estimator, no
    combination (what a rank job orders by)."""
    candidates = [n for n in means if not n.startswith(("linear_probe", "random")) and n not in STATIC
                  and not (single and n.startswith("mean_rank"))]
    return max(candidates, key=lambda n: means[n]["weightedtau"]) if candidates else None


KEY_RANKINGS = ("logme@last", "logme@all", "logme_projected@all", "ridge_loo@all", "hscore_shrinkage@all",
                "linear_probe_cv@all", "params", "width", "random order (expected)")


def key_table(stores: dict[str, dict[str, Any]], truth_name: str = "probe") -> list[str]:
    """Per data set and sample size: weighted τ and Rel@1 of the rankings a reader compares first (the old
    default, the new one, the static orders, a trained probe, chance)."""
    cols = [(s, rows) for s in stores for rows in sorted({r for v in agreements(stores[s], truth_name).values()
                                                           for r in v})]
    lines = ["| ranking | " + " | ".join(f"{s} @{r}" for s, r in cols) + " |", "|---|" + "---|" * len(cols)]
    results = {s: agreements(stores[s], truth_name) for s in stores}
    for name in KEY_RANKINGS:
        cells = []
        for s, rows in cols:
            a = results[s].get(name, {}).get(rows)
            cells.append("n/a" if a is None else f"{fmt(a['weightedtau'], 2)} / {fmt(a['rel1'], 2)}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def report(stores: dict[str, dict[str, Any]], holdout: list[str]) -> list[str]:
    lines = ["# Model selection suite", "", "Weighted τ / Rel@1 against the head-only truth, per set and sample size:",
             ""] + key_table(stores) + [""]
    for name, store in stores.items():
        meta = store["meta"]
        lines += [f"## {name}: {meta['kind']}, {meta['task']}, {meta['rows']} distinct rows, "
                  f"{len(meta['train'])} train pool / {len(meta['test'])} test", "",
                  f"Machine: {meta['machine']}; max_length {meta['max_length']}", ""]
        lines += model_table(store) + [""]
        resolution = truth_resolution(store)
        if resolution:
            lines += [resolution, ""]
        for truth_name in truths(store):
            lines += [f"Agreement with the {truth_name} truth (mean over draws, per sample size):", ""]
            lines += agreement_table(agreements(store, truth_name)) + [""]
    choice_sets = [s for s in stores if s not in holdout]
    for truth_name in ("probe", "finetune"):
        sets = [s for s in choice_sets if truth_name in truths(stores[s])]
        if not sets:
            continue
        table, means = summary(stores, sets, truth_name)
        best = chosen(means)
        lines += [f"## Summary against the {truth_name} truth over {', '.join(sets)}", ""]
        lines += table + ["", f"Best estimator ranking by mean weighted τ: **{best}**; best single estimator: "
                          f"**{chosen(means, single=True)}**", ""]
        held = [s for s in holdout if s in stores and truth_name in truths(stores[s])]
        if held and best:
            lines += [f"Held-out set(s), added after the choice: {', '.join(held)}", ""]
            held_table, _ = summary(stores, held, truth_name)
            lines += held_table + [""]
    return lines

