"""Scoring is shared by `evaluate` and the report without an import cycle (function-level imports
count), and the package root still gives `evaluate_split`."""

import keras_seg
from test_deploy_imports import import_graph, reaches


def test_evaluate_and_the_report_do_not_import_each_other():
    graph = import_graph()
    assert "keras_seg.evaluate" in graph and "keras_seg.report.collect" in graph
    # evaluate imports keras_seg.report (its HTML page): the report must not come back to evaluate.
    assert "keras_seg.report" in graph["keras_seg.evaluate"]
    for name in ("keras_seg.evaluate", "keras_seg.report.collect", "keras_seg.scoring"):
        assert not reaches(graph, name, name), (name, sorted(graph[name]))
    assert "keras_seg.scoring" in graph["keras_seg.report.collect"]


def test_evaluate_split_is_the_one_function_from_every_entry_point():
    from keras_seg import evaluate, scoring

    assert keras_seg.evaluate_split is scoring.evaluate_split is evaluate.evaluate_split
    assert evaluate.EvaluationError is scoring.EvaluationError
