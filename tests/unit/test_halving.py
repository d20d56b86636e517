"""Successive-halving ranking: elimination rule, nested stratified samples, feature reuse, and agreement with a full
rank() when nothing may be eliminated. Tiny random models; labels are a linear threshold of model A's features, so A
is the right answer, and model D (word embeddings zeroed: its features see only the text's length) is clearly worse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from service.datasets import ParsedDataset, write_normalized  # noqa: E402
from tests.tiny_models import _COMMON_WORDS, make_tiny_bert  # noqa: E402
from workers import features as features_module  # noqa: E402
from workers.halving import nested_order, paired_elimination, rank_successive_halving, round_sizes  # noqa: E402
from workers.pipeline import DatasetSpec, ModelSpec, rank, rank_in_full, rank_with_verdict  # noqa: E402

ROWS = 256


# ---------------------------------------------------------------- pure parts

def test_paired_elimination_uses_the_paired_replicate_fraction() -> None:
    b = 100
    leader = np.full(b, 1.0)
    # candidate below the leader in 96 of 100 replicates, equal in 2 (count 1/2 each), above in 2: P = 0.97
    close = np.concatenate([np.zeros(96), np.ones(2), np.full(2, 2.0)])
    far = np.zeros(b)  # always below: P = 1
    point = {"lead": 1.0, "close": 0.5, "far": 0.0}
    reps = {"lead": leader, "close": close, "far": far}
    top, p, out = paired_elimination(point, reps, confidence=0.95)
    assert top == "lead" and p == pytest.approx({"close": 0.97, "far": 1.0}) and out == ["close", "far"]
    assert paired_elimination(point, reps, confidence=0.98)[2] == ["far"]
    assert paired_elimination(point, reps, confidence=0.97)[2] == ["close", "far"]  # P >= confidence drops
    assert paired_elimination(point, reps, confidence=1.0)[2] == []  # certainty is never claimed
    # min_models keeps the best of the would-be-dropped
    assert paired_elimination(point, reps, confidence=0.95, min_models=2)[2] == ["far"]
    assert paired_elimination(point, reps, confidence=0.95, min_models=3)[2] == []


def test_paired_elimination_is_paired_not_marginal() -> None:
    # both models share a large per-replicate shift; the leader is always 0.01 ahead: paired P = 1 although the
    # marginal intervals overlap almost completely
    shift = np.random.default_rng(0).normal(0, 1, 200)
    _, p, out = paired_elimination({"a": 0.01, "b": 0.0}, {"a": shift + 0.01, "b": shift}, 0.95)
    assert p["b"] == 1.0 and out == ["b"]


def test_round_sizes_grow_to_all_rows() -> None:
    assert round_sizes(1000, 256, 2.0) == [256, 512, 1000]
    assert round_sizes(100, 256, 2.0) == [100]
    assert round_sizes(10, 3, 1.2) == [3, 4, 5, 6, 8, 10]  # always grows by at least one row


def test_nested_order_prefixes_are_stratified_and_complete() -> None:
    labels = np.array([0] * 70 + [1] * 25 + [2] * 5)
    order = nested_order(labels, "classification", seed=4)
    assert sorted(order.tolist()) == list(range(100))
    share = np.bincount(labels) / len(labels)
    for s in range(3, 101):  # brute force over every prefix
        counts = np.bincount(labels[order[:s]], minlength=3)
        assert counts.min() >= 1  # every class present as soon as there is room for it
        assert np.all(np.abs(counts - s * share) <= 2.0), (s, counts)
    assert not np.array_equal(order, nested_order(labels, "classification", seed=5))
    assert sorted(nested_order(np.linspace(0, 1, 30), "regression", 0).tolist()) == list(range(30))


# ---------------------------------------------------------------- with tiny models

@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("halving")
    a = make_tiny_bert(root / "a", hidden_size=32, seed=0)
    b = make_tiny_bert(root / "b", hidden_size=16, seed=1)
    d = make_tiny_bert(root / "d", hidden_size=32, seed=3)
    from safetensors.torch import load_file, save_file

    weights = load_file(d / "model.safetensors")
    weights["embeddings.word_embeddings.weight"].zero_()  # D sees positions only: its features encode length
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})

    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(_COMMON_WORDS, size=int(rng.integers(3, 9)))) + f" {i}" for i in range(ROWS)]
    fa = features_module.extract_features(a, texts).features
    projection = (fa - fa.mean(0)) @ np.random.default_rng(1).standard_normal(fa.shape[1])
    labels = (projection > np.median(projection)).astype(int)
    path = root / "data.parquet"
    write_normalized(ParsedDataset(texts, labels.tolist(), ["lo", "hi"], None, ROWS), "classification", path)
    dataset = DatasetSpec(path, "classification", ["lo", "hi"])
    models = [ModelSpec(name, name, "local", str(folder), "") for name, folder in
              (("d", d), ("b", b), ("a", a))]
    return {"root": root, "dataset": dataset, "models": models, "texts": texts, "labels": labels}


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str]]]:
    """Every extract_features call: (model folder name, texts)."""
    calls: list[tuple[str, list[str]]] = []
    real = features_module.extract_features

    def wrapper(model_dir, texts, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((Path(model_dir).name, list(texts)))
        return real(model_dir, texts, **kwargs)

    monkeypatch.setattr(features_module, "extract_features", wrapper)
    return calls


def run(setup: dict, cache: Path, **kwargs) -> object:  # type: ignore[no-untyped-def]
    return rank_successive_halving(setup["dataset"], setup["models"], cache_root=cache,
                                   hf_cache_dir=setup["root"] / "hf", **{"initial_rows": 32, **kwargs})


def test_clearly_worse_model_is_eliminated_early_and_best_wins(setup: dict, tmp_path: Path) -> None:
    result = run(setup, tmp_path / "cache")
    rounds = result.rounds
    assert [r.rows for r in rounds][:2] == [32, 64]
    dropped_d = [r.index for r in rounds if "d" in r.eliminated]
    assert dropped_d and dropped_d[0] <= 1  # by 64 rows
    ranking = result.ranking
    assert ranking[0].model_id == "a" and not ranking[0].details["eliminated"]
    assert ranking[-1].model_id == "d"
    entry = ranking[-1].details
    assert entry["eliminated"] and entry["eliminated_round"] == dropped_d[0]
    assert entry["eliminated_at_rows"] == rounds[dropped_d[0]].rows and entry["p_leader_better"] >= 0.95
    assert [m.rank for m in ranking] == [1, 2, 3]
    # less work than a full ranking: D's features were never extracted for most rows
    assert result.rows_models < result.rows_models_full == 3 * ROWS
    assert sum(r.new_rows * len(r.survivors) for r in rounds) == result.rows_models
    # the feature map shows the models of the last round, on its rows: the eliminated one's features are gone
    mapped = result.feature_map
    assert "d" not in {m["model_id"] for m in mapped["models"]} and mapped["of_rows"] == rounds[-1].rows
    assert all(len(m["points"]) == mapped["rows"] == len(mapped["labels"]) for m in mapped["models"])


def test_eliminated_models_rank_by_elimination_order() -> None:
    from workers.halving import HalvingRound, _final_ranking

    models = [ModelSpec(k, k, "local", k, "") for k in "wxyz"]
    dropped = {"x": {"round": 0, "rows": 8, "reason": "confidently behind the leader", "score": 0.9,
                     "p_leader_better": 0.99, "leader": "w", "interval": [0, 1], "prior": None},
               "y": {"round": 1, "rows": 16, "reason": "confidently behind the leader", "score": -5.0,
                     "p_leader_better": 0.99, "leader": "w", "interval": [0, 1], "prior": None},
               "z": {"round": 1, "rows": 16, "reason": "confidently behind the leader", "score": -4.0,
                     "p_leader_better": 0.99, "leader": "w", "interval": [0, 1], "prior": None}}
    last = HalvingRound(1, 16, 8, ["w", "y", "z"], ["y", "z"], "w", {}, {}, 0.0, 0.0)
    ranked = _final_ranking(models, ["w"], {"w": 1.0, "y": -5.0, "z": -4.0}, {}, dropped, [last], "logme", None,
                            dict.fromkeys("wxyz", 0.0))
    # a later elimination outranks an earlier one whatever the scores (x's 0.9 came from fewer rows)
    assert [m.model_id for m in ranked] == ["w", "z", "y", "x"]


def test_samples_are_nested_and_stratified(setup: dict, tmp_path: Path) -> None:
    result = run(setup, tmp_path / "cache", confidence=1.0)
    assert [r.rows for r in result.rounds] == [32, 64, 128, 256]
    labels = setup["labels"]
    for earlier, later in zip(result.rounds, result.rounds[1:]):
        assert set(earlier.row_indices.tolist()) < set(later.row_indices.tolist())
    for r in result.rounds:
        assert len(set(r.row_indices.tolist())) == r.rows
        assert abs(int(labels[r.row_indices].sum()) - r.rows / 2) <= 1  # balanced labels stay balanced


def test_features_of_earlier_rows_are_not_recomputed(setup: dict, tmp_path: Path,
                                                     counted: list[tuple[str, list[str]]]) -> None:
    result = run(setup, tmp_path / "cache")
    texts = setup["texts"]
    for model in ("a", "b", "d"):
        seen = [t for name, batch in counted if name == model for t in batch]
        assert len(seen) == len(set(seen))  # no text went through this model twice
        rounds_in = [r for r in result.rounds if model in r.survivors]
        assert len([1 for name, _ in counted if name == model]) == len(rounds_in)  # one call per round
        assert set(seen) == {texts[i] for i in rounds_in[-1].row_indices}  # exactly the rows it was scored on
    assert sum(len(batch) for _, batch in counted) == result.rows_models
    # a repeated job finds every chunk in the cache (the key names the rows) and gives the same ranking
    counted.clear()
    again = run(setup, tmp_path / "cache")
    assert counted == [] and again.rows_models == 0 and again.forward_seconds == 0.0
    assert [m.model_id for m in again.ranking] == [m.model_id for m in result.ranking]
    for x, y in zip(again.ranking, result.ranking):
        assert x.scores["logme"] == pytest.approx(y.scores["logme"], rel=1e-12)
    # other rows (another seed) are other cache entries
    counted.clear()
    run(setup, tmp_path / "cache", seed=1)
    assert sum(len(batch) for _, batch in counted) > 0


def test_confidence_one_eliminates_nothing_and_equals_full_rank(setup: dict, tmp_path: Path) -> None:
    result = run(setup, tmp_path / "halving", confidence=1.0)
    assert all(r.eliminated == [] for r in result.rounds) and result.rounds[-1].rows == ROWS
    full = rank(setup["dataset"], setup["models"], ["logme"], cache_root=tmp_path / "full",
                hf_cache_dir=setup["root"] / "hf")
    assert [m.model_id for m in result.ranking] == [m.model_id for m in full]
    assert [m.rank for m in result.ranking] == [m.rank for m in full]
    for mine, theirs in zip(result.ranking, full):
        # features come from other batches (other padding), equal to float32 rounding
        assert mine.scores["logme"] == pytest.approx(theirs.scores["logme"], rel=1e-6)
        assert mine.details["intervals"]["logme"] == pytest.approx(theirs.details["intervals"]["logme"], rel=1e-6)
        assert mine.details["p_better_than_next"] == pytest.approx(theirs.details["p_better_than_next"])
        assert mine.details["logme_prior_only"] == pytest.approx(theirs.details["logme_prior_only"], rel=1e-12)
    # on all rows the halving's feature map is the full ranking's (rows in dataset order either way)
    mapped = rank_in_full(setup["dataset"], setup["models"], ["logme"], cache_root=tmp_path / "full",
                          hf_cache_dir=setup["root"] / "hf").feature_map
    assert result.feature_map["labels"] == mapped["labels"]
    theirs = {m["model_id"]: m["points"] for m in mapped["models"]}
    assert {m["model_id"] for m in result.feature_map["models"]} == set(theirs)
    for mine in result.feature_map["models"]:
        assert np.allclose(np.abs(mine["points"]), np.abs(theirs[mine["model_id"]]), atol=1e-3)


def test_a_rank_job_tokenises_each_text_once_for_candidates_sharing_a_tokenizer(
        setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenised: list[int] = []
    real_encode = features_module.text.encode
    monkeypatch.setattr(features_module.text, "encode",
                        lambda tok, texts, length: tokenised.append(len(texts)) or real_encode(tok, texts, length))
    ranking = rank(setup["dataset"], setup["models"], ["logme"], cache_root=tmp_path / "cache",
                   hf_cache_dir=setup["root"] / "hf")
    assert len(ranking) == len(setup["models"]) >= 3  # three folders, one tokenizer
    assert sum(tokenised) == ROWS


def test_stops_at_min_models(setup: dict, tmp_path: Path) -> None:
    result = run(setup, tmp_path / "cache", confidence=0.6, min_models=2)
    survivors = [m for m in result.ranking if not m.details["eliminated"]]
    assert len(survivors) >= 2
    assert len(result.rounds[-1].survivors) - len(result.rounds[-1].eliminated) == len(survivors)
    with pytest.raises(ValueError):
        run(setup, tmp_path / "cache", growth=1.0)
    with pytest.raises(ValueError):
        run(setup, tmp_path / "cache", bootstrap_samples=0)


def test_rank_puts_a_candidate_that_cannot_run_last_with_its_error(setup: dict, tmp_path: Path) -> None:
    """A candidate that cannot be loaded (here: a truncated weights file) does not sink the ranking: the others are
    ranked, the broken one is listed last with no scores and the reason, and only when no candidate can be scored
    does the job fail, naming each one."""
    import shutil

    from workers.pipeline import CandidatesFailed

    broken = tmp_path / "truncated-weights"
    shutil.copytree(Path(next(m.locator for m in setup["models"] if m.id == "a")), broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    broken_spec = ModelSpec("broken", "truncated-weights", "local", str(broken), "")
    good = [m for m in setup["models"] if m.id in ("a", "b")]
    ranking = rank(setup["dataset"], [broken_spec, *good], ["logme", "hscore"], cache_root=tmp_path / "cache",
                   hf_cache_dir=setup["root"] / "hf", bootstrap_samples=20)
    assert [r.model_id for r in ranking] == ["a", "b", "broken"] and [r.rank for r in ranking] == [1, 2, 3]
    last = ranking[-1]
    assert last.scores == {"logme": None, "hscore": None} and last.details["beats_prior"] is False
    assert last.details["error"].split(":")[0].endswith(("Error", "Exception"))
    assert "intervals" in ranking[0].details and ranking[0].details["intervals"]["logme"]
    with pytest.raises(CandidatesFailed, match="truncated-weights"):
        rank(setup["dataset"], [broken_spec], ["logme"], cache_root=tmp_path / "cache",
             hf_cache_dir=setup["root"] / "hf")


def test_halving_drops_a_candidate_that_cannot_run_and_lists_it_last(setup: dict, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "truncated-weights"
    shutil.copytree(Path(next(m.locator for m in setup["models"] if m.id == "a")), broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    models = [ModelSpec("broken", "truncated-weights", "local", str(broken), ""), *setup["models"]]
    result = rank_successive_halving(setup["dataset"], models, cache_root=tmp_path / "cache",
                                     hf_cache_dir=setup["root"] / "hf", initial_rows=32)
    assert result.ranking[0].model_id == "a"
    last = result.ranking[-1]
    assert last.model_id == "broken" and last.scores == {"logme": None} and last.details["reason"] == "failed"
    assert last.details["error"] and last.rank == len(models)


def test_halving_by_ridge_loo_ranks_by_held_out_accuracy(setup: dict, tmp_path: Path) -> None:
    """Any metric with paired replicates drives the rounds: ridge_loo's re-weighted held-out outcomes included."""
    result = run(setup, tmp_path / "cache", metric="ridge_loo")
    assert result.metric == "ridge_loo"
    ranking = result.ranking
    assert ranking[0].model_id == "a" and ranking[-1].model_id == "d"
    scores = [m.scores["ridge_loo"] for m in ranking if not m.details["eliminated"]]
    assert all(0.0 <= s <= 1.0 for s in scores) and scores == sorted(scores, reverse=True)


def test_image_datasets_rank_through_successive_halving(tmp_path: Path) -> None:
    """Nested samples of encoded images: the same halving code reads them and ranks the image models."""
    import io

    from PIL import Image

    from tests.tiny_models import make_tiny_mobilenet, make_tiny_vit

    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(64):
        tint = np.array([(200, 40, 40), (40, 40, 200)][i % 2])
        out = io.BytesIO()
        Image.fromarray(np.clip(tint + rng.normal(0, 60, (32, 32, 3)), 0, 255).astype(np.uint8)).save(out, "PNG")
        images.append(out.getvalue())
        labels.append(i % 2)
    path = tmp_path / "images.parquet"
    write_normalized(ParsedDataset(images, labels, ["red", "blue"], None, 64, modality="image"), "classification",
                     path)
    models = [ModelSpec("vit", "vit", "local", str(make_tiny_vit(tmp_path / "vit")), ""),
              ModelSpec("cnn", "cnn", "local", str(make_tiny_mobilenet(tmp_path / "cnn")), "")]
    result = rank_successive_halving(DatasetSpec(path, "classification", ["red", "blue"]), models,
                                     cache_root=tmp_path / "cache", hf_cache_dir=tmp_path / "hf", initial_rows=16)
    assert [r.rows for r in result.rounds][0] == 16
    assert sorted(m.model_id for m in result.ranking) == ["cnn", "vit"]
    assert all(np.isfinite(m.scores["logme"]) for m in result.ranking)


def test_the_first_metric_orders_the_ranking_and_the_prior_check_comes_with_logme(
        setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.ranking as ranking_module

    real = ranking_module.score_estimator

    def reversed_ridge(name, features, labels, task, **kwargs):  # type: ignore[no-untyped-def]
        value = real(name, features, labels, task, **kwargs)
        return 1.0 - value if name == "ridge_loo" else value  # so that its order is not LogME's

    monkeypatch.setattr(ranking_module, "score_estimator", reversed_ridge)
    kwargs = dict(cache_root=tmp_path / "cache", hf_cache_dir=setup["root"] / "hf", bootstrap_samples=0)
    by_ridge = rank(setup["dataset"], setup["models"], ["ridge_loo", "logme"], **kwargs)
    by_logme = rank(setup["dataset"], setup["models"], ["logme", "ridge_loo"], **kwargs)
    for ranking, metric in ((by_ridge, "ridge_loo"), (by_logme, "logme")):
        values = [m.scores[metric] for m in ranking]
        assert values == sorted(values, reverse=True) and [m.rank for m in ranking] == [1, 2, 3]
    assert [m.model_id for m in by_ridge] == [m.model_id for m in reversed(by_logme)]
    assert all(m.details.get("logme_prior_only") is not None for m in by_ridge)
    alone = rank(setup["dataset"], setup["models"], ["ridge_loo"], **kwargs)
    assert [m.model_id for m in alone] == [m.model_id for m in by_ridge]
    assert all(m.details.get("logme_prior_only") is None and "logme" not in m.scores for m in alone)


def test_text_pairs_rank_through_successive_halving_and_a_second_round_reuses_the_first(setup: dict,
                                                                                        tmp_path: Path) -> None:
    """Pairs read from the normalised file go through nested samples like texts; a repeated job is served from the
    cache (keyed by the pairs themselves, so the same texts unpaired are other examples)."""
    texts, labels = setup["texts"], setup["labels"]
    pairs = [(a, b) for a, b in zip(texts, texts[1:] + texts[:1])]
    path = tmp_path / "pairs.parquet"
    write_normalized(ParsedDataset(pairs, labels.tolist(), ["lo", "hi"], None, ROWS), "classification", path)
    dataset = DatasetSpec(path, "classification", ["lo", "hi"])
    kwargs = dict(cache_root=tmp_path / "cache", hf_cache_dir=setup["root"] / "hf", initial_rows=32)
    first = rank_successive_halving(dataset, setup["models"], **kwargs)
    assert sorted(m.model_id for m in first.ranking) == ["a", "b", "d"]
    assert all(np.isfinite(m.scores["logme"]) for m in first.ranking)
    again = rank_successive_halving(dataset, setup["models"], **kwargs)
    assert all(m.feature_seconds == 0.0 for m in again.ranking) and any(m.feature_seconds > 0 for m in first.ranking)
    assert [m.scores["logme"] for m in again.ranking] == [m.scores["logme"] for m in first.ranking]
    singles = rank(setup["dataset"], setup["models"], ["logme"], **{k: v for k, v in kwargs.items()
                                                                    if k != "initial_rows"})
    assert not any(m.details["features_cached"] for m in singles)


def test_a_ranking_and_a_halving_come_with_the_same_verdict(setup: dict, tmp_path: Path) -> None:
    halved = run(setup, tmp_path / "halving", confidence=1.0)
    ranked, verdict = rank_with_verdict(setup["dataset"], setup["models"], ["logme"], cache_root=tmp_path / "full",
                                        hf_cache_dir=setup["root"] / "hf")
    assert verdict["top"] == ranked[0].model_id == halved.verdict["top"]
    assert verdict["confident"] == halved.verdict["confident"]
    assert verdict["indistinguishable_from_top"] == halved.verdict["indistinguishable_from_top"]
    assert all(r.details["parameters"] > 0 for r in ranked)  # as each extraction counted them
    assert set(verdict["p_top_beats"]) == {r.model_id for r in ranked[1:]}


def test_every_layer_comes_from_one_forward_pass_and_the_cache(setup: dict, tmp_path: Path) -> None:
    result = features_module.extract_features(Path(setup["models"][2].locator), setup["texts"][:20])
    layers = result.layer_features
    assert layers is not None and layers.shape == (20, 3, 32)  # embedding output + tiny BERT's 2 layers, 32-d
    assert np.allclose(layers[:, -1], result.features, rtol=2e-3, atol=2e-3)  # the last layer, in float16
    assert np.allclose(result.select("all"), layers[:, 1:].astype(np.float32).mean(1))
    assert np.allclose(result.select([0, -1]), layers[:, [0, 2]].astype(np.float32).mean(1))
    with pytest.raises(ValueError, match="out of range"):
        result.select([5])

    kwargs = dict(cache_root=tmp_path / "cache", hf_cache_dir=setup["root"] / "hf")
    last, _ = rank_with_verdict(setup["dataset"], setup["models"], ["logme"], **kwargs)
    mean, _ = rank_with_verdict(setup["dataset"], setup["models"], ["logme"], layers="all", **kwargs)
    assert not any(r.details["features_cached"] for r in last)
    assert all(r.details["features_cached"] for r in mean)  # another layer choice: no forward pass
    by_id = {r.model_id: r.scores["logme"] for r in last}
    # tiny random BERTs change their states by ~1% per layer, so the mean moves the scores a little, but it does
    assert all(abs(r.scores["logme"] - by_id[r.model_id]) > 1e-6 for r in mean)
    same, _ = rank_with_verdict(setup["dataset"], setup["models"], ["logme"], layers=[-1], **kwargs)
    for entry in same:  # the last layer read back from the stack: LogME on float16-rounded features
        assert entry.scores["logme"] == pytest.approx(by_id[entry.model_id], abs=2e-2)
    halved = rank_successive_halving(setup["dataset"], setup["models"], "logme", layers="all", initial_rows=40,
                                     **kwargs)
    assert {r.model_id for r in halved.ranking} == {m.id for m in setup["models"]}


def test_a_prefetch_extracts_each_rounds_survivors_elsewhere_and_the_ranking_is_unchanged(
        setup: dict, tmp_path: Path, counted: list) -> None:
    """The service's workers extract a round's features (prefetch) into the shared cache; the ranking reads them
    from there, counts their time, and ends as a ranking done in one process does."""
    from workers.halving import round_examples, round_features

    alone = run(setup, tmp_path / "alone")
    calls: list[tuple[int, list[str]]] = []
    extraction = dict(cache_root=tmp_path / "shared", hf_cache_dir=setup["root"] / "hf", max_length=128,
                      batch_size=32, device=None, pooling="mean")

    def prefetch(round_index, survivors, examples, tag, span):  # type: ignore[no-untyped-def]
        assert (examples, tag) == round_examples(setup["dataset"], round_index, initial_rows=32)
        calls.append((round_index, [m.id for m in survivors]))
        return {m.id: round_features(m, examples, tag, extraction) for m in survivors}

    counted.clear()
    shared = run(setup, tmp_path / "shared", prefetch=prefetch)
    assert [(c[0], sorted(c[1])) for c in calls] == [(r.index, sorted(r.survivors)) for r in shared.rounds]
    assert len(counted) == sum(len(r.survivors) for r in shared.rounds)  # each extraction once, by the prefetch
    assert [(m.model_id, m.scores) for m in shared.ranking] == [(m.model_id, m.scores) for m in alone.ranking]
    assert shared.rows_models == alone.rows_models and shared.forward_seconds > 0

    def failing(round_index, survivors, examples, tag, span):  # type: ignore[no-untyped-def]
        return {"d": {"error": "OutOfMemoryError: CUDA out of memory"}}

    result = run(setup, tmp_path / "failing", prefetch=failing)
    assert result.ranking[-1].model_id == "d" and result.ranking[-1].details["error"].startswith("OutOfMemory")
