"""Segmentation metrics from a confusion matrix: IoU, accuracy and Dice, per class and mean.

Everything here is computed from one confusion matrix `cm` of shape [C, C] where `cm[t, p]`
counts the pixels of ground-truth class `t` predicted as `p` (rows: ground truth, as in the
Cityscapes evaluation script). Pixels labelled `ignore_index` (255) are not counted.

Two layers:
- numpy functions on a confusion matrix (`per_class_iou`, `mean_iou`, `cityscapes_category_matrix`,
  ...), reusable for offline evaluation;
- Keras metrics (`MeanIoU`, `PixelAccuracy`, `MeanDice`) that accumulate the matrix over batches
  from logits, in a sum-aggregated variable, so that under `tf.distribute` the replicas' matrices
  add up.

A class absent from both the ground truth and the predictions has no IoU (NaN) and is left out of
the means, as the Cityscapes script and MMSegmentation do; a class predicted but absent from the
ground truth has IoU 0.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_seg.labels import CITYSCAPES_CATEGORIES, CITYSCAPES_LABELS, IGNORE_INDEX, trainid_to_category

# --------------------------------------------------------------------------- numpy, on a confusion matrix


def confusion_matrix(y_true, y_pred, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """The [C, C] int64 confusion matrix of class-index arrays `y_true` and `y_pred` (same shape).

    Ground-truth pixels equal to `ignore_index`, or outside 0..num_classes-1, are not counted.
    """
    y_true = np.asarray(y_true).astype(np.int64).ravel()
    y_pred = np.asarray(y_pred).astype(np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in size: {y_true.size} vs {y_pred.size}")
    valid = (y_true != ignore_index) & (y_true >= 0) & (y_true < num_classes)
    counts = np.bincount(y_true[valid] * num_classes + y_pred[valid], minlength=num_classes**2)
    return counts[: num_classes**2].reshape(num_classes, num_classes)


def _ratio(numerator, denominator):
    """numerator / denominator, NaN where the denominator is 0."""
    numerator = np.asarray(numerator, np.float64)
    denominator = np.asarray(denominator, np.float64)
    return np.divide(numerator, denominator, out=np.full_like(numerator, np.nan), where=denominator > 0)


def _nanmean(values) -> float:
    """Mean over the non-NaN values; NaN when there are none (without numpy's warning)."""
    values = np.asarray(values, np.float64)
    present = ~np.isnan(values)
    return float(values[present].mean()) if present.any() else float("nan")


def per_class_iou(cm) -> np.ndarray:
    """IoU = TP / (TP + FP + FN) per class; NaN for a class absent from ground truth and predictions."""
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    return _ratio(tp, cm.sum(0) + cm.sum(1) - tp)


def per_class_accuracy(cm) -> np.ndarray:
    """Accuracy (recall) = TP / ground-truth pixels per class; NaN for a class absent from the ground truth."""
    cm = np.asarray(cm, np.float64)
    return _ratio(np.diag(cm), cm.sum(1))


def per_class_dice(cm) -> np.ndarray:
    """Dice (F1) = 2 TP / (2 TP + FP + FN) per class; NaN for a class absent from ground truth and predictions."""
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    return _ratio(2 * tp, cm.sum(0) + cm.sum(1))


def pixel_accuracy(cm) -> float:
    """Correct pixels / counted pixels (MMSegmentation's aAcc); NaN when nothing was counted."""
    cm = np.asarray(cm, np.float64)
    return float(_ratio(np.trace(cm), cm.sum()))


def mean_iou(cm) -> float:
    """Mean of the per-class IoUs over the classes present in ground truth or predictions."""
    return _nanmean(per_class_iou(cm))


def mean_accuracy(cm) -> float:
    """Mean of the per-class accuracies over the classes present in the ground truth (mAcc)."""
    return _nanmean(per_class_accuracy(cm))


def mean_dice(cm) -> float:
    """Mean of the per-class Dice scores over the classes present in ground truth or predictions."""
    return _nanmean(per_class_dice(cm))


def cityscapes_category_matrix(cm) -> np.ndarray:
    """The 7x7 category confusion matrix (flat, construction, ..., vehicle) of a 19-class trainId matrix.

    Pixel by pixel, mapping ground truth and prediction to their categories sums the blocks of the
    class matrix, which is what the official category evaluation counts.
    """
    cm = np.asarray(cm)
    if cm.shape != (19, 19):
        raise ValueError(f"the Cityscapes categories need a 19x19 trainId confusion matrix, got shape {cm.shape}")
    to_category = trainid_to_category()[:19].astype(np.int64)
    members = np.eye(len(CITYSCAPES_CATEGORIES), dtype=cm.dtype)[to_category]  # [19, 7] one-hot
    return members.T @ cm @ members


def category_mean_iou(cm) -> float:
    """Cityscapes category mIoU (7 categories) of a 19-class trainId confusion matrix."""
    return mean_iou(cityscapes_category_matrix(cm))


def is_cityscapes_trainid(num_classes: int, class_names=None, label_space: str | None = None) -> bool:
    """Whether a label space is Cityscapes' 19 trainId classes: by its name (`trainid`) or its class names."""
    if num_classes != 19:
        return False
    trainable = sorted((lab for lab in CITYSCAPES_LABELS if 0 <= lab.train_id < 255), key=lambda lab: lab.train_id)
    trainid_names = [lab.name for lab in trainable]
    return label_space == "trainid" or (class_names is not None and [str(n) for n in class_names] == trainid_names)


def summarize_confusion(cm, class_names=None, label_space: str | None = None) -> dict:
    """Every metric of a confusion matrix in one dict, for logs, JSON summaries and evaluation.

    Keys: `miou`, `mean_accuracy`, `pixel_accuracy`, `mean_dice` (floats, NaN when undefined);
    `per_class_iou`, `per_class_accuracy`, `per_class_dice` (lists, NaN for absent classes);
    `confusion_matrix` (the numpy matrix); and for the 19 Cityscapes trainId classes (see
    `is_cityscapes_trainid`) `category_miou` and `per_category_iou` (flat ... vehicle).
    """
    cm = np.asarray(cm)
    summary = {
        "miou": mean_iou(cm),
        "mean_accuracy": mean_accuracy(cm),
        "pixel_accuracy": pixel_accuracy(cm),
        "mean_dice": mean_dice(cm),
        "per_class_iou": per_class_iou(cm).tolist(),
        "per_class_accuracy": per_class_accuracy(cm).tolist(),
        "per_class_dice": per_class_dice(cm).tolist(),
        "confusion_matrix": cm,
    }
    if is_cityscapes_trainid(len(cm), class_names, label_space):
        categories = cityscapes_category_matrix(cm)
        summary["category_miou"] = mean_iou(categories)
        summary["per_category_iou"] = per_class_iou(categories).tolist()
    return summary


def format_table(cm, class_names) -> str:
    """A per-class table (Class | IoU | Acc, in %) and a summary line (aAcc, mIoU, mAcc), MMSegmentation-style."""
    if len(class_names) != len(cm):
        raise ValueError(f"{len(class_names)} class names for a {len(cm)}-class confusion matrix")
    width = max(len("Class"), *(len(str(n)) for n in class_names))
    rule = f"+-{'-' * width}-+--------+--------+"
    lines = [rule, f"| {'Class':<{width}} |    IoU |    Acc |", rule]
    for name, iou, acc in zip(class_names, per_class_iou(cm), per_class_accuracy(cm)):
        lines.append(f"| {name:<{width}} | {_percent(iou)} | {_percent(acc)} |")
    lines.append(rule)
    lines.append(
        f"aAcc {_percent(pixel_accuracy(cm)).strip()}  mIoU {_percent(mean_iou(cm)).strip()}  "
        f"mAcc {_percent(mean_accuracy(cm)).strip()}  ('-': class absent, left out of the means)"
    )
    return "\n".join(lines)


def _percent(value) -> str:
    return "     -" if np.isnan(value) else f"{100 * value:6.2f}"


# --------------------------------------------------------------------------- Keras metrics


class ConfusionMatrixMetric(keras.metrics.Metric):
    """Base of the metrics that accumulate a confusion matrix; subclasses define `result`.

    `update_state(y_true, y_pred)` takes masks [B, H, W] or [B, H, W, 1] (class indices, any
    integer or float dtype, `ignore_index` for ignored pixels) and either logits / probabilities
    [B, H, W, num_classes] (the arg-max is taken) or predicted class indices shaped like `y_true`;
    an optional `sample_weight` per image [B] or per pixel [B, H, W] weights the counts.
    The matrix is a float64 variable (exact counts up to 2**53) with sum aggregation: under
    `tf.distribute` each replica accumulates its own and reading the metric adds them up.

    Args:
        num_classes: int. Number of classes.
        ignore_index: int. Ground-truth value of pixels not counted; values outside
            0..num_classes-1 are not counted either.
        name: str. Metric name.
        dtype: Dtype of `result()`.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, name=None, dtype=None):
        super().__init__(name=name, dtype=dtype)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.counts = self.add_variable(
            shape=(self.num_classes, self.num_classes), initializer="zeros", dtype="float64", name="confusion_matrix"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        labels = ops.cast(y_true, "int32")
        if len(labels.shape) == 4:
            labels = ops.squeeze(labels, axis=-1)
        if len(y_pred.shape) == 4 and y_pred.shape[-1] != 1:
            predictions = ops.argmax(y_pred, axis=-1)
        else:
            predictions = ops.reshape(y_pred, ops.shape(labels))
        predictions = ops.cast(predictions, "int32")

        valid = (labels != self.ignore_index) & (labels >= 0) & (labels < self.num_classes)
        cells = ops.reshape(ops.where(valid, labels * self.num_classes + predictions, 0), (-1, 1))
        if sample_weight is None:
            weights = ops.cast(valid, "int32")
        else:  # per image [B], or per pixel [B, H, W] or [B, H, W, 1]
            sample_weight = ops.cast(sample_weight, "float32")
            if len(sample_weight.shape) == 4:
                sample_weight = ops.squeeze(sample_weight, axis=-1)
            while len(sample_weight.shape) < 3:
                sample_weight = ops.expand_dims(sample_weight, axis=-1)
            weights = ops.cast(valid, "float32") * sample_weight
        # A scatter-add, as Keras' own confusion matrix: it compiles under XLA (jit_compile).
        batch_counts = ops.scatter(cells, ops.reshape(weights, (-1,)), (self.num_classes**2,))
        self.counts.assign_add(ops.reshape(ops.cast(batch_counts, "float64"), (self.num_classes, self.num_classes)))

    def reset_state(self):
        self.counts.assign(ops.zeros((self.num_classes, self.num_classes), "float64"))

    def confusion_matrix(self) -> np.ndarray:
        """The accumulated confusion matrix as numpy int64, summed over replicas (weighted counts are rounded)."""
        return np.rint(self.counts.numpy()).astype(np.int64)

    def per_class_iou(self) -> np.ndarray:
        return per_class_iou(self.confusion_matrix())

    def per_class_accuracy(self) -> np.ndarray:
        return per_class_accuracy(self.confusion_matrix())

    def _class_statistics(self):
        """True positives, ground-truth pixels and predicted pixels per class, float64 tensors."""
        cm = ops.convert_to_tensor(self.counts)
        return ops.diagonal(cm), ops.sum(cm, axis=1), ops.sum(cm, axis=0)

    def _mean_where(self, numerator, denominator):
        """Mean of numerator / denominator over the classes whose denominator is > 0; 0 when none is."""
        present = denominator > 0
        ratios = ops.where(present, numerator / ops.maximum(denominator, 1.0), 0.0)
        count = ops.sum(ops.cast(present, "float64"))
        return ops.cast(ops.sum(ratios) / ops.maximum(count, 1.0), self.dtype)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "ignore_index": self.ignore_index}


@keras.saving.register_keras_serializable(package="keras_seg")
class MeanIoU(ConfusionMatrixMetric):
    """Mean intersection over union over the classes present in ground truth or predictions.

    Takes logits (no need for Keras' `sparse_y_pred=False`), ignores `ignore_index`, leaves out
    classes absent from both ground truth and predictions, and gives 0 before any pixel is counted.

    Example:

    ```python
    model.compile(optimizer="adam", loss=CrossEntropyLoss(), metrics=[MeanIoU(num_classes=19)])
    ```
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, name="mean_iou", dtype=None):
        super().__init__(num_classes, ignore_index, name=name, dtype=dtype)

    def result(self):
        tp, ground_truth, predicted = self._class_statistics()
        return self._mean_where(tp, ground_truth + predicted - tp)


@keras.saving.register_keras_serializable(package="keras_seg")
class PixelAccuracy(ConfusionMatrixMetric):
    """Correctly classified pixels / counted pixels; 0 before any pixel is counted."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, name="pixel_accuracy", dtype=None):
        super().__init__(num_classes, ignore_index, name=name, dtype=dtype)

    def result(self):
        tp, ground_truth, _ = self._class_statistics()
        return ops.cast(ops.sum(tp) / ops.maximum(ops.sum(ground_truth), 1.0), self.dtype)


@keras.saving.register_keras_serializable(package="keras_seg")
class MeanDice(ConfusionMatrixMetric):
    """Mean Dice (F1) over the classes present in ground truth or predictions; 0 before any pixel is counted."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, name="mean_dice", dtype=None):
        super().__init__(num_classes, ignore_index, name=name, dtype=dtype)

    def result(self):
        tp, ground_truth, predicted = self._class_statistics()
        return self._mean_where(2 * tp, ground_truth + predicted)
