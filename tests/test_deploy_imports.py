"""The inference modules import without a cycle (function-level imports included), and the package
root still gives their public names."""

import ast
import pathlib

import keras_seg

PACKAGE = pathlib.Path(keras_seg.__file__).parent
DEPLOY_MODULES = ("keras_seg.inference", "keras_seg.runtimes", "keras_seg.segmenter", "keras_seg.export")


def imported_modules(path):
    """Modules that `path` imports anywhere in its text (top level or inside functions); the package
    uses absolute imports only."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from keras_seg import runtimes`
    return found


def import_graph():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return {name: imported_modules(path) & set(modules) - {name} for name, path in modules.items()}


def reaches(graph, start, goal):
    seen, todo = set(), [start]
    while todo:
        current = todo.pop()
        for nxt in graph.get(current, ()):
            if nxt == goal:
                return True
            if nxt not in seen and nxt != "keras_seg":  # the root's lazy map imports nothing at import time
                seen.add(nxt)
                todo.append(nxt)
    return False


def test_no_import_cycle_through_the_inference_modules():
    graph = import_graph()
    assert "keras_seg.inference" in graph and "keras_seg.runtimes" in graph
    cycles = [name for name in DEPLOY_MODULES if name in graph and reaches(graph, name, name)]
    assert cycles == [], {name: sorted(graph[name]) for name in cycles}


def test_package_root_names_resolve_to_their_classes():
    from keras_seg import inference, runtimes

    assert keras_seg.Segmenter is inference.Segmenter
    assert keras_seg.load_segmenter is inference.load_segmenter
    assert keras_seg.InferenceError is inference.InferenceError
    assert issubclass(keras_seg.InferenceError, ValueError)
    # the runtimes raise the very class callers catch
    assert runtimes.InferenceError is keras_seg.InferenceError
