"""docs/report.md and docs/evaluation.md as written (issue 31 item 11, evaluate's and the report's part):
every command parses, an exported model is named as the file `export` writes, the reserved drawing time
is the planner's; and evaluate's read error names the split it read."""

import importlib
import os
import re
import shlex

import pytest
import tensorflow as tf

from keras_seg import evaluate
from keras_seg.export import ARTIFACT_FILES
from keras_seg.training.cadence import REPORT_DRAW_SECONDS

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def commands(name):
    """(module, argv) of every `python -m keras_seg.X ...` line in the doc's code blocks; [optional]
    parts left out, comments dropped, continued lines joined."""
    text = open(os.path.join(DOCS, name)).read()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line)
            line = re.sub(r"\[[^\]]*\]", "", line)
            match = re.match(r"python -m (keras_seg\.\w+) (.*)", line.strip())
            if match:
                found.append((match[1], shlex.split(match[2])))
    return found


def flag(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


def exported_models():
    """What the docs' export commands write: an artifact's file (OUTPUT/model.tflite, ...), or the
    SavedModel folder OUTPUT/RUN_NAME (the default format and name)."""
    paths = set()
    for doc in ("deploy.md", "evaluation.md"):
        for module, argv in commands(doc):
            if module == "keras_seg.export":
                fmt, output = flag(argv, "--format"), flag(argv, "--output")
                if fmt in ARTIFACT_FILES:
                    paths.add(f"{output}/{ARTIFACT_FILES[fmt]}")
                elif fmt in (None, "saved_model"):
                    paths.add(f"{output}/{flag(argv, '--name') or os.path.basename(flag(argv, '--run'))}")
    return paths


@pytest.mark.parametrize("doc", ["report.md", "evaluation.md"])
def test_the_docs_commands_parse_and_name_models_as_export_writes_them(doc):
    found = commands(doc)
    assert found
    for module, argv in found:
        parser = importlib.import_module(module if module != "keras_seg.report" else "keras_seg.report.__main__")
        parser.build_parser().parse_args(argv)  # exits 2 on a flag that does not exist
        model = flag(argv, "--model")
        if module in ("keras_seg.evaluate", "keras_seg.predict") and model and not model.startswith("runs/"):
            assert flag(argv, "--output"), (doc, argv)  # an export is never written into
            # a folder holding an artifact is refused: the model is what an export command writes
            assert model.rstrip("/") in exported_models(), (doc, argv, sorted(exported_models()))


def test_the_reserved_drawing_time_is_the_planners():
    text = open(os.path.join(DOCS, "report.md")).read()
    stated = re.search(r"and (\d+(?:\.\d+)?) s of drawing in the final phase", text)
    assert stated and float(stated[1]) == REPORT_DRAW_SECONDS


def test_a_read_error_names_the_split_it_read(tmp_path, monkeypatch, capsys):
    from keras_seg import demo
    from tiny_run import write_run

    data_dir = demo.write_demo_dataset(str(tmp_path / "data"), splits={"val": 1}, size=(32, 64), log=lambda _: None)
    run = write_run(tmp_path / "run")

    def failing(*args, **kwargs):
        raise tf.errors.InvalidArgumentError(None, None, "mask and image sizes differ in a record")

    monkeypatch.setattr(evaluate, "evaluate_split", failing)
    with pytest.raises(SystemExit):
        evaluate.main(["--model", run, "--data", data_dir, "--no-progress"])  # no --split: the default, val
    assert capsys.readouterr().err == (f"error: reading {data_dir} split 'val': mask and image sizes differ in a "
                                       "record\n")
