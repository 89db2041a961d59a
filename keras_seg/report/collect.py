"""What a report shows, gathered: a run directory's files, and its best model scored image by image.

A run stopped before its first validation has no best model and no metrics: every field that
needs them is None, and the page says so.
"""

from __future__ import annotations

import csv
import dataclasses
import heapq
import json
import os

import numpy as np

from keras_seg.run_dir import RunDir, read_best

HISTORY_NUMBERS = ("step", "epoch", "loss", "train_miou", "val_miou", "val_pixel_accuracy", "val_mean_dice",
                   "learning_rate", "seconds")


class ReportError(ValueError):
    """A run directory or file the report cannot be made from, said in one line."""


@dataclasses.dataclass
class Sample:
    """One val image with its ground truth, predictions (run label -> class ids) and per-image mIoU."""

    index: int
    image: np.ndarray
    mask: np.ndarray
    predictions: dict
    scores: dict


class ImageScores:
    """An `evaluate_split(on_image=...)` callback: every image's mIoU, and the K worst and K best images.

    `keep`: indices whose image and prediction are kept too (a comparison shows the same images).
    """

    def __init__(self, k=4, keep=()):
        self.k = k
        self.keep = set(keep)
        self.scores = []
        self.kept = {}
        self._worst, self._best = [], []  # heaps of (key, index, image, mask, prediction)

    def __call__(self, image, mask, prediction, cm):
        from keras_seg import metrics

        index = len(self.scores)
        score = metrics.mean_iou(cm)
        self.scores.append(score)
        if index in self.keep:
            self.kept[index] = (image, mask, prediction)
        if np.isnan(score) or not self.k:
            return
        item = (image, mask, prediction)
        for heap, key in ((self._worst, -score), (self._best, score)):
            entry = (key, -index, item)
            if len(heap) < self.k:
                heapq.heappush(heap, entry)
            elif entry[:2] > heap[0][:2]:
                heapq.heapreplace(heap, entry)

    def ranked(self, which) -> list:
        """[(index, score, (image, mask, prediction))]: "worst" from the lowest, "best" from the highest."""
        heap = self._worst if which == "worst" else self._best
        entries = sorted(heap, key=lambda e: e[:2], reverse=True)
        return [(-e[1], abs(e[0]), e[2]) for e in entries]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_history(path) -> list:
    """history.csv as rows of floats (step as int); a missing file is no rows."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                values = {k: float(row[k]) for k in HISTORY_NUMBERS if row.get(k) not in (None, "")}
            except ValueError:
                continue  # a line being written when the run stopped
            if "step" in values:
                values["step"] = int(values["step"])
                rows.append(values)
    return rows


@dataclasses.dataclass
class Run:
    """A run directory's files as the report reads them (None where a file is absent)."""

    root: str
    label: str
    config: dict
    info: dict
    history: list
    best: dict | None
    timing: dict | None
    has_best_model: bool
    best_note: str | None = None  # why `best` is None though best_metrics.json exists

    @property
    def class_names(self) -> list:
        return [str(n) for n in self.info["class_names"]]

    @property
    def class_colors(self) -> list:
        return self.info["class_colors"]

    @property
    def best_step(self):
        return None if self.best is None else self.best.get("step")


def load_run(root, label=None) -> Run:
    config_path = os.path.join(root, "config.json")
    if not os.path.isdir(root):
        raise ReportError(f"{root}: no such run directory")
    if not os.path.exists(config_path):
        raise ReportError(f"{root}: no config.json (not a keras_seg.train run directory)")
    config = read_json(config_path)
    info_path = os.path.join(root, "dataset_info.json")
    if not os.path.exists(info_path):
        raise ReportError(f"{root}: no dataset_info.json (the run stopped before it started training)")
    timing_path = os.path.join(root, "timing.json")
    best, why = read_best(RunDir(root))
    return Run(root=root, label=label or os.path.basename(os.path.normpath(root)), config=config,
               info=read_json(info_path), history=read_history(os.path.join(root, "history.csv")),
               best=best, timing=read_json(timing_path) if os.path.exists(timing_path) else None,
               has_best_model=os.path.exists(os.path.join(root, "best.keras")),
               best_note=why if os.path.exists(os.path.join(root, "best_metrics.json")) else None)


def score_run(run: Run, k=4, keep=(), batch_size=4, limit=0):
    """The run's best model on its val split (`limit`: its first images only), image by image:
    (summary, ImageScores), or (None, why)."""
    data_dir = run.config.get("data")
    if not run.has_best_model:
        return None, "no best.keras in the run (no validation has run yet, or it was removed)"
    if not data_dir or not os.path.exists(os.path.join(data_dir, "dataset_info.json")):
        return None, f"the run's data {data_dir} is not here: the val images were not scored"
    from keras_seg import inference
    from keras_seg.scoring import evaluate_split

    segmenter = inference.load_segmenter(run.root)
    scores = ImageScores(k, keep)
    summary = evaluate_split(segmenter, data_dir, batch_size=batch_size, progress=False, on_image=scores,
                             limit=limit)
    return summary, scores


def pixel_shares(cm):
    """Each class's share of the ground-truth pixels, from a confusion matrix's rows."""
    totals = np.asarray(cm, np.float64).sum(axis=1)
    return (totals / max(totals.sum(), 1.0)).tolist()
