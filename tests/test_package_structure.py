"""The package's shape (issue 30): no import cycle anywhere in keras_seg (function-level imports
included; a cycle there was how the trainer and its precision probe built each other), and no class
longer than one reading holds."""

import ast

from test_deploy_imports import PACKAGE, import_graph, reaches

MOST_CLASS_LINES = 400


def test_no_module_of_the_package_reaches_itself_by_imports():
    graph = import_graph()
    assert "keras_seg.training.trainer" in graph and "keras_seg.training.precision_probe" in graph
    cycles = sorted(name for name in graph if reaches(graph, name, name))
    assert cycles == [], {name: sorted(graph[name]) for name in cycles}


def test_the_cycle_check_sees_a_cycle():
    assert reaches({"a": {"b"}, "b": {"c"}, "c": {"a"}}, "a", "a")
    assert not reaches({"a": {"b"}, "b": {"c"}, "c": set()}, "a", "a")


def test_no_class_is_longer_than_one_reading():
    long = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MOST_CLASS_LINES:
                long[f"{path.relative_to(PACKAGE)}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert long == {}
