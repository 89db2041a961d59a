"""The run report (keras_seg.report): a self-contained page per run, comparisons, evaluate --report, and what
the trainer records for it (timing.json, the confusion-matrix image in TensorBoard)."""

import base64
import glob
import html.parser
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import cv2
import numpy as np
import pytest

from keras_seg import evaluate, inference, report
from keras_seg.report.__main__ import main as report_main
from keras_seg.training.trainer import Trainer
from test_train import REPO, make_config, tiny_data  # noqa: F401 (fixture)

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
LENGTH = ["--iters", "6", "--val-every", "3", "--no-export", "--warmup-iters", "0"]


class Page(html.parser.HTMLParser):
    """Parses a page, checking that every element is closed in order; collects images, SVGs and tables."""

    def __init__(self, text):
        super().__init__()
        self.stack, self.images, self.cells = [], [], {}
        self._table, self._cell = None, None
        self.feed(text)
        self.close()
        assert not self.stack, f"unclosed elements: {self.stack}"
        self.svgs = re.findall(r"<svg .*?</svg>", text, flags=re.S)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "table" and attrs.get("id"):
            self._table = attrs["id"]
            self.cells[self._table] = []
        if tag == "tr" and self._table:
            self.cells[self._table].append([])
        if tag in ("td", "th") and self._table:
            self._cell = attrs
            self.cells[self._table][-1].append([attrs, ""])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()
        if tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._table and self.cells[self._table] and self.cells[self._table][-1]:
            self.cells[self._table][-1][-1][1] += data


def check_self_contained(path) -> Page:
    """The page parses, every image decodes, every SVG is well-formed, and nothing points outside it."""
    with open(path) as f:
        text = f.read()
    page = Page(text)
    for src in page.images:
        assert src.startswith("data:image/png;base64,"), src[:40]
        image = cv2.imdecode(np.frombuffer(base64.b64decode(src.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.size > 0
    for svg in page.svgs:
        ET.fromstring(svg)
    assert not re.search(r"(https?:|ftp:)//|<script|<link|@import", text, flags=re.I)
    return page


def quiet(_):
    pass


@pytest.fixture(scope="module")
def finished(tiny_data, tmp_path_factory):  # noqa: F811
    """A 6-step run validated at steps 3 and 6, and the lines it printed."""
    run, lines = str(tmp_path_factory.mktemp("report") / "run"), []
    Trainer(make_config(tiny_data, run, *LENGTH), log=lines.append).run()
    return run, lines


def test_a_page_from_run_files_alone(tmp_path):
    """Light: a run directory's files without a model (as a run whose best.keras is gone): the page parses,
    holds nothing external, and shows best_metrics.json's numbers."""
    from keras_seg.labels import cityscapes_label_space

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"preset": "unet_small", "data": str(tmp_path / "gone"),
                                                 "time_budget": 0.0, "resolved": {"precision": "float32"}}))
    (run / "dataset_info.json").write_text(json.dumps({"source": "demo", "splits": {"val": {"num_examples": 8}},
                                                       **cityscapes_label_space("trainid").to_json()}))
    (run / "history.csv").write_text("step,epoch,loss,train_miou,val_miou,val_pixel_accuracy,val_mean_dice,"
                                     "learning_rate,seconds\n3,1,2.5,0.1,0.2,0.5,0.3,0.001,4\n"
                                     "6,2,2.0,0.2,0.25,0.6,0.35,0.0005,4\n")
    ious = [0.5 + c / 100 for c in range(18)] + [None]
    (run / "best_metrics.json").write_text(json.dumps({"step": 6, "epoch": 2, "miou": 0.25, "per_class_iou": ious}))
    path = report.write_run_report(str(run))
    page = check_self_contained(path)
    shown = [cells[2][0]["data-iou"] for cells in page.cells["per-class-iou"][1:]]
    assert shown[:18] == [f"{v:.6f}" for v in ious[:18]] and shown[18] == ""
    text = open(path).read()
    assert "<b>25.00</b> mIoU (19 classes) at step 6" in text and "no best.keras" in text
    assert len(page.svgs) == 4 and not page.images  # 3 curves, the per-class bars; nothing scored


@pytest.mark.slow  # trains a run (15-40 s on CPU-D)
def test_a_finished_run_ends_pointing_at_its_self_contained_report(finished):
    run, lines = finished
    assert lines[-1] == f"report: {os.path.join(run, 'report.html')}"
    page = check_self_contained(os.path.join(run, "report.html"))
    assert len(page.images) == 8  # the 4 worst and 4 best val images (8 in the split)
    assert len(page.svgs) == 3 + 1 + 1  # 3 learning curves, per-class bars, confusion matrix


@pytest.mark.slow  # trains a run (15-40 s on CPU-D)
def test_the_page_shows_best_metrics_and_the_scorers_confusion_counts(finished, tiny_data):  # noqa: F811
    run, _ = finished
    page = Page(open(os.path.join(run, "report.html")).read())
    with open(os.path.join(run, "best_metrics.json")) as f:
        best = json.load(f)
    shown = [cells[2][0]["data-iou"] for cells in page.cells["per-class-iou"][1:]]
    assert len(shown) == 19
    for value, expected in zip(shown, best["per_class_iou"]):
        assert (value == "") if expected is None else float(value) == pytest.approx(expected, abs=1e-6)
    assert f"{100 * best['miou']:.2f}</b> mIoU (19 classes) at step {best['step']}" in open(
        os.path.join(run, "report.html")).read()
    scored = evaluate.evaluate_split(inference.load_segmenter(run), tiny_data, progress=False)
    counts = np.array([[int(text) for _, text in row[1:]] for row in page.cells["confusion-counts"][1:]])
    np.testing.assert_array_equal(counts, scored["confusion_matrix"])


@pytest.mark.slow  # trains a run (15-40 s on CPU-D)
def test_timing_and_tensorboard_confusion_images_of_each_validation(finished):
    import tensorflow as tf

    run, _ = finished
    with open(os.path.join(run, "timing.json")) as f:
        timing = json.load(f)
    assert (timing["steps"], timing["validations"]) == (6, 2)
    assert all(timing[k] > 0 for k in ("start_up_seconds", "step_seconds", "validation_seconds",
                                       "checkpoint_seconds", "final_phase_seconds"))
    images, scalars = {}, set()
    for path in glob.glob(os.path.join(run, "logs", "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == "val_confusion_matrix":
                    images[event.step] = tf.io.decode_png(value.tensor.string_val[2]).numpy()
                scalars.add(value.tag)
    assert sorted(images) == [3, 6]
    assert images[3].ndim == 3 and images[3].shape[0] > 19 * 20  # 19 rows of cells
    assert "val_iou/road" in scalars


@pytest.mark.slow  # trains a run (15-40 s on CPU-D)
def test_a_run_stopped_before_and_after_its_first_validation_gets_a_page(tiny_data, tmp_path):  # noqa: F811
    for name, stop_at in (("before", "training unet"), ("midway", "step 3/6")):
        run = str(tmp_path / name)

        def stop(line, stop_at=stop_at):
            if line.startswith(stop_at):
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            Trainer(make_config(tiny_data, run, *LENGTH), log=stop).run()
        assert not os.path.exists(os.path.join(run, "report.html"))
        assert report_main([run, "-k", "2"]) == 0
        text = open(os.path.join(run, "report.html")).read()
        page = check_self_contained(os.path.join(run, "report.html"))
        if name == "before":
            assert "no validation yet" in text and not page.images
        else:
            assert "at step 3" in text and len(page.images) == 4


@pytest.mark.slow  # trains a run (15-40 s on CPU-D)
def test_two_runs_compared_on_one_page(finished, tiny_data, tmp_path):  # noqa: F811
    run_a, _ = finished
    run_b = str(tmp_path / "b")
    Trainer(make_config(tiny_data, run_b, *LENGTH, "--learning-rate", "0.01"), log=quiet).run()
    out = str(tmp_path / "compare.html")
    assert report_main([run_a, run_b, "-o", out, "-k", "2"]) == 0
    page = check_self_contained(out)
    rows = page.cells["per-class-compare"][1:]
    a, b = (json.load(open(os.path.join(r, "best_metrics.json")))["per_class_iou"] for r in (run_a, run_b))
    for c, row in enumerate(rows):
        if a[c] is not None and b[c] is not None:
            assert float(row[3][1]) == pytest.approx(100 * (b[c] - a[c]), abs=0.006)
    assert len(page.images) == 4  # the first run's 2 worst and 2 best, each with both predictions


def test_report_command_refuses_bad_input_in_one_line(tmp_path, capsys):
    run = str(tmp_path / "run")
    os.makedirs(run)
    open(os.path.join(run, "config.json"), "w").write("{}")
    for argv, message in (([str(tmp_path)], "not a run directory (no config.json)"),
                          ([run, run], "comparing runs needs -o FILE"),
                          ([run, "-o", os.path.join(run, "config.json")], "exists: --overwrite")):
        with pytest.raises(SystemExit) as stopped:
            report_main(argv)
        assert stopped.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow  # trains a run (15-40 s on CPU-D)
def test_a_failing_report_says_why_and_the_run_stands(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    def fail(root, **kwargs):
        raise RuntimeError("disk full\nsecond line")

    monkeypatch.setattr(report, "write_run_report", fail)
    lines = []
    summary = Trainer(make_config(tiny_data, tmp_path / "run", "--iters", "2", "--no-export"),
                      log=lines.append).run()
    assert summary["steps"] == 2 and os.path.exists(tmp_path / "run" / "last.keras")
    assert lines[-1].startswith("report: not written (RuntimeError: disk full); rebuild it with")


@pytest.mark.slow  # trains a run (15-40 s on CPU-D)
def test_evaluate_writes_the_same_sections(finished, tiny_data, tmp_path):  # noqa: F811
    run, _ = finished
    out, page_path = str(tmp_path / "eval"), str(tmp_path / "eval.html")
    assert evaluate.main(["--model", run, "--data", tiny_data, "--output", out, "--report", page_path,
                          "--no-progress"]) == 0
    page = check_self_contained(page_path)
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    counts = np.array([[int(text) for _, text in row[1:]] for row in page.cells["confusion-counts"][1:]])
    np.testing.assert_array_equal(counts, metrics["confusion_matrix"])
    assert len(page.images) == 8
    with pytest.raises(SystemExit) as stopped:  # an existing page is not replaced without --overwrite
        evaluate.main(["--model", run, "--data", tiny_data, "--output", out, "--report", page_path])
    assert stopped.value.code == 2


def test_drawing_a_report_needs_no_plotting_library_nor_tensorflow():
    """The charts are SVG drawn by hand: the report imports neither matplotlib nor TensorFlow to draw them
    (Keras imports matplotlib at `import keras` whenever it is installed: docs/report.md)."""
    code = ("import sys\nfrom keras_seg.report import charts\n"
            "rows = [{'step': s, 'loss': 1 / s, 'val_miou': s / 10, 'learning_rate': 1e-3} for s in (1, 2, 3)]\n"
            "charts.learning_curves([('a', rows, 3)])\n"
            "charts.confusion([[5, 1], [0, 3]], ['x', 'y'])\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'tensorflow', 'keras'}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


@pytest.mark.slow  # a training process (30-60 s on CPU-D)
def test_the_command_line_ends_pointing_at_the_report(tiny_data, tmp_path):  # noqa: F811
    run = str(tmp_path / "run")
    out = subprocess.run(
        [sys.executable, "-m", "keras_seg.train", "--preset", "unet_small", "--data", tiny_data, "--output", run,
         "--no-progress", "--image-size", "64x128", "--model-arg", "depth=3", "--model-arg", "base_filters=8",
         "--batch-size", "4", "--precision", "float32", "--iters", "2", "--no-export"],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].endswith(f"; open {os.path.join(run, 'report.html')}"), out.stdout
    check_self_contained(os.path.join(run, "report.html"))
