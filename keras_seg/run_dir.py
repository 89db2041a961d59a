"""The run directory: where a training run leaves everything a person reads (README, "A run directory").

Every file is written so that an interruption at any moment leaves the previous version or the new
one, never half of one: models and JSON go to a temporary file that is renamed, and the history is
rewritten up to the step a resumed run continues from.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os

import numpy as np

from keras_seg.files import file_sha256, publish, temp_path_beside, write_json_atomically, write_text_atomically

HISTORY_COLUMNS = ("step", "epoch", "loss", "train_miou", "val_miou", "val_pixel_accuracy", "val_mean_dice",
                   "learning_rate", "seconds")


class RunDir:
    """Paths of a run directory."""

    def __init__(self, root):
        self.root = root
        self.config = os.path.join(root, "config.json")
        self.dataset_info = os.path.join(root, "dataset_info.json")
        self.history = os.path.join(root, "history.csv")
        self.logs = os.path.join(root, "logs")
        self.checkpoints = os.path.join(root, "checkpoints")
        self.best_model = os.path.join(root, "best.keras")
        self.last_model = os.path.join(root, "last.keras")
        self.best_table = os.path.join(root, "best_per_class_iou.txt")
        self.best_metrics = os.path.join(root, "best_metrics.json")
        self.samples = os.path.join(root, "samples.png")
        self.saved_model = os.path.join(root, "saved_model")


def save_model_atomically(model, path):
    """`model.save` to a temporary file beside `path`, then rename: `path` is never half-written."""
    import keras

    tmp = temp_path_beside(path, suffix=".keras")  # Keras wants the .keras suffix
    # Synchronized batch norm is how several replicas train, not part of the model: saved, it makes
    # the file load only on TensorFlow (JAX and torch have no such layer option).
    synchronized = [layer for layer in model._flatten_layers(include_self=False, recursive=True)
                    if isinstance(layer, keras.layers.BatchNormalization) and layer.synchronized]
    try:
        for layer in synchronized:
            layer.synchronized = False
        model.save(tmp)
        publish(tmp, path)
    finally:
        for layer in synchronized:
            layer.synchronized = True
        if os.path.exists(tmp):
            os.remove(tmp)


class History:
    """history.csv: one row per validation. A resumed run keeps the rows up to its checkpoint's step."""

    def __init__(self, path, keep_until_step=0):
        rows = []
        if keep_until_step and os.path.exists(path):
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if "step" in r and int(r["step"]) <= keep_until_step]
        # The kept rows go to a new file that replaces the old one whole: a process killed here
        # leaves the previous history, never a truncated one.
        partial = path + ".partial"
        with open(partial, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow(row)
        os.replace(partial, path)
        self._file = open(path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=HISTORY_COLUMNS)

    def append(self, row):
        self._writer.writerow({k: row[k] for k in HISTORY_COLUMNS})
        self._file.flush()

    def close(self):
        self._file.close()


def publish_best(run_dir: RunDir, model, step, epoch, result, table):
    """best.keras and the metrics of the validation that made it best, as one unit (`write_best`)."""
    save_model_atomically(model, run_dir.best_model)
    write_best(run_dir, step, epoch, result, table)


def write_best(run_dir: RunDir, step, epoch, result, table):
    """The best validation's per-class table and every metric (NaN, for a class absent from the data, as null),
    bound to the best.keras they describe, which must be written first.

    Model and metrics are two files, each replaced atomically: a process killed between the two leaves
    the new model beside the previous metrics. The metrics carry the SHA-256 of the model file's bytes
    (`model_sha256`), so `read_best` tells metrics of another best.keras from its own and never
    passes them off as its own. (Writing both into a temporary folder swapped in whole would change the
    run directory's layout, which evaluate, export and people read.)"""
    model_sha256 = file_sha256(run_dir.best_model)
    summary = {k: v for k, v in result.items() if k != "confusion_matrix"}
    write_json_atomically(run_dir.best_metrics, {"step": step, "epoch": epoch, "model_sha256": model_sha256,
                                                 **summary})  # NaN -> null
    write_text_atomically(run_dir.best_table, f"best: step {step} (epoch {epoch:.2f}), best.keras SHA-256 "
                                              f"{model_sha256[:16]}\n{table}\n")


def read_best(run_dir: RunDir):
    """(best_metrics.json's dict, None) when it describes the run's best.keras, else (None, why in a phrase).

    Metrics written before they were bound to their model (no `model_sha256`) are taken as they are,
    as are metrics whose best.keras was removed (nothing there to mismatch)."""
    if not os.path.exists(run_dir.best_metrics):
        return None, "no best_metrics.json"
    best = read_json(run_dir.best_metrics)
    recorded = best.get("model_sha256")
    if recorded and os.path.exists(run_dir.best_model) and recorded != file_sha256(run_dir.best_model):
        return None, (f"{run_dir.best_metrics} describes an earlier best.keras (the run was stopped between "
                      "writing the two): its metrics are not shown")
    return best, None


def read_json(path):
    with open(path) as f:
        return json.load(f)


def weights_fingerprint(model) -> str:
    """First 16 hex digits of the SHA-256 of all weights."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()[:16]
