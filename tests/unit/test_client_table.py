"""The CLI's ranking table (service.client.ranking_table): scores with intervals, n/a, and failed candidates."""

from service.client import ranking_table


def test_table_shows_intervals_not_applicable_and_failures() -> None:
    job = {"metrics": ["logme", "leep"], "ranking": [
        {"rank": 1, "model": "good", "scores": {"logme": 0.25, "leep": None}, "intervals": {"logme": [0.2, 0.3]},
         "p_better_than_next": {"logme": 0.97}, "logme_prior_only": -0.5, "beats_prior": True,
         "feature_seconds": 1.25},
        {"rank": 2, "model": "broken", "scores": {"logme": None, "leep": None}, "intervals": {},
         "p_better_than_next": {}, "logme_prior_only": -0.5, "beats_prior": False, "feature_seconds": 0.0,
         "error": "OSError: no tokenizer"},
    ]}
    table = ranking_table(job)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["rank", "model", "logme", "[95%"]
    assert "0.2500 [0.200, 0.300]" in lines[2] and "n/a" in lines[2] and "0.97" in lines[2] and "yes" in lines[2]
    assert lines[3].split()[:4] == ["2", "broken", "n/a", "n/a"]
    assert "LogME of the label-prior-only baseline: -0.5000" in table
    assert "models do not beat it" not in table  # the failed candidate has no score to compare
    assert table.endswith("broken could not be scored: OSError: no tokenizer")
    job["ranking"][0]["beats_prior"] = False
    assert "1 of 1 models do not beat it" in ranking_table(job) and "--metric ridge_loo" in ranking_table(job)
    job["metrics"] = ["ridge_loo", "logme"]
    job["ranking"][0]["scores"]["ridge_loo"] = 0.9
    assert "do not beat it" in ranking_table(job) and "--metric ridge_loo" not in ranking_table(job)


def test_rank_command_sends_the_job_options_it_was_given() -> None:
    from service.cli import _job_body, build_parser

    args = build_parser().parse_args(["rank", "ds1", "--metric", "logme", "--metric", "ridge_loo", "--pooling",
                                      "head", "--sample-size", "50"])
    assert _job_body(args) == {"dataset_id": "ds1", "metrics": ["logme", "ridge_loo"], "sample_size": 50,
                               "pooling": "head"}
    assert "pooling" not in _job_body(build_parser().parse_args(["rank", "ds1"]))


def test_tune_command_sets_the_head_and_the_ood_dataset() -> None:
    from service.cli import _job_body, build_parser

    args = build_parser().parse_args(["tune", "ds1", "--tune", '{"epochs": 2, "head": "linear"}', "--head", "sngp",
                                      "--ood-dataset", "ds2"])
    assert _job_body(args)["tune"] == {"epochs": 2, "head": "sngp", "ood_dataset_id": "ds2"}
    assert "head" not in _job_body(build_parser().parse_args(["tune", "ds1"]))["tune"]


def test_softdecay_flags_and_the_table_naming_the_transform() -> None:
    from service.cli import _job_body, build_parser

    bare = _job_body(build_parser().parse_args(["rank", "ds1", "--softdecay"]))
    assert bare == {"dataset_id": "ds1", "feature_transform": "softdecay"}  # the server fills in its alpha
    given = _job_body(build_parser().parse_args(["tune", "ds1", "--softdecay", "-0.3", "--tune-softdecay", "-0.1"]))
    assert given["softdecay_alpha"] == -0.3 and given["tune"]["softdecay"] == {"alpha": -0.1}
    assert "feature_transform" not in _job_body(build_parser().parse_args(["rank", "ds1"]))
    job = {"metrics": ["ridge_loo"], "ranking": [{"rank": 1, "model": "m", "scores": {"ridge_loo": 0.5},
                                                  "feature_seconds": 0.0}],
           "ranked_by": {"features": {"transform": {"name": "softdecay", "alpha": -0.6}}}}
    assert "Features transformed: softdecay (alpha -0.6)" in ranking_table(job)
    job["ranked_by"]["features"]["transform"] = "none"
    assert "transformed" not in ranking_table(job)
