"""best.keras and best_metrics.json as one unit (issue 31 item 13): the metrics name the model file they
describe, and a reader never shows metrics beside a model they do not describe; the report escapes every
field it takes from the run's files."""

import hashlib
import json

import keras
import numpy as np

from keras_seg import report
from keras_seg.labels import cityscapes_label_space
from keras_seg.run_dir import RunDir, save_model_atomically, write_best

HISTORY = ("step,epoch,loss,train_miou,val_miou,val_pixel_accuracy,val_mean_dice,learning_rate,seconds\n"
           "3,1,2.5,0.1,0.2,0.5,0.3,0.001,4\n6,2,2.0,0.2,0.3,0.6,0.35,0.0005,4\n")


def tiny_model(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(19, 1)])


def validation(miou):
    return {"miou": miou, "pixel_accuracy": 0.5, "per_class_iou": [miou] * 19, "confusion_matrix": np.eye(19)}


def run_files(root, config=None, info=None):
    """A run directory's files without its data (nothing is scored): enough for a page."""
    root.mkdir()
    (root / "config.json").write_text(json.dumps(config or {"preset": "unet_small", "data": str(root / "gone"),
                                                            "resolved": {"precision": "float32"}}))
    (root / "dataset_info.json").write_text(json.dumps(info or {"source": "demo", "splits": {"val": {}},
                                                                **cityscapes_label_space("trainid").to_json()}))
    (root / "history.csv").write_text(HISTORY)
    return RunDir(str(root))


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_the_metrics_name_the_model_they_describe(tmp_path):
    from keras_seg.run_dir import publish_best, read_best

    run_dir = run_files(tmp_path / "run")
    publish_best(run_dir, tiny_model(1), 3, 1.0, validation(0.2), "table")
    best, why = read_best(run_dir)
    assert why is None and best["step"] == 3 and best["model_sha256"] == sha256(run_dir.best_model)
    first_line = f"best: step 3 (epoch 1.00), best.keras SHA-256 {best['model_sha256'][:16]}\n"
    assert open(run_dir.best_table).readline() == first_line


def test_a_kill_between_model_and_metrics_never_shows_the_old_metrics_as_the_new_models(tmp_path):
    run_dir = run_files(tmp_path / "run")
    # The trainer's sequence at step 3 (as it calls them today), then at step 6 killed between the two writes.
    save_model_atomically(tiny_model(1), run_dir.best_model)
    write_best(run_dir, 3, 1.0, validation(0.2), "table")
    save_model_atomically(tiny_model(2), run_dir.best_model)
    text = open(report.write_run_report(run_dir.root)).read()
    assert "<b>20.00</b> mIoU" not in text and "at step 3" not in text
    assert text.count("describes an earlier best.keras") == 2  # the header's best, and the per-class section
    from keras_seg.run_dir import read_best

    best, why = read_best(run_dir)
    assert best is None and "describes an earlier best.keras" in why
    write_best(run_dir, 6, 2.0, validation(0.3), "table")  # the next best writes both again
    assert read_best(run_dir)[0]["step"] == 6


def test_report_fields_from_the_run_files_are_escaped(tmp_path):
    hostile = "<script>alert(1)</script>"
    config = {"preset": "unet_small", "data": str(tmp_path / "gone"),
              "resolved": {"precision": "float32", "replicas": hostile, "global_batch_size": hostile}}
    info = {"source": "demo", "splits": {"val": {}}, **cityscapes_label_space("trainid").to_json(),
            "num_classes": hostile}
    run_dir = run_files(tmp_path / "run", config, info)
    with open(run_dir.best_metrics, "w") as f:
        json.dump({"step": hostile, "epoch": 2, "miou": 0.3, "per_class_iou": [0.3] * 19}, f)
    with open(tmp_path / "run" / "timing.json", "w") as f:
        json.dump({"step_seconds": 10.0, "steps": hostile, "validations": hostile}, f)
    text = open(report.write_run_report(run_dir.root)).read()
    assert "<script" not in text
    assert text.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 7  # step x3, classes, replicas, batch, timing
    comparison = open(report.write_comparison([run_dir.root, run_dir.root], str(tmp_path / "compare.html"))).read()
    assert "<script" not in comparison and "&lt;script&gt;" in comparison
