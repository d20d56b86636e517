"""The API's accepted names (torch-free, service/schemas.py) match the worker registries they dispatch to."""

from service import schemas


def test_metric_names_and_tasks_match_the_ranking_registry() -> None:
    from workers.ranking import METRICS

    assert set(schemas.METRICS) == set(METRICS)
    for name, metric in METRICS.items():
        for task in schemas.TASKS:
            assert schemas.metric_applies(name, task) == metric.applies_to(task), (name, task)


def test_regularizer_names_match_the_tuning_registry() -> None:
    from workers.tuning.regularizers import REGULARIZERS

    assert set(schemas.REGULARIZERS) == set(REGULARIZERS)
