"""A callback that reports per-class validation IoU and accuracy after each validation."""

from __future__ import annotations

import os

import keras
import numpy as np

from keras_seg import metrics as seg_metrics


def _key(name: str) -> str:
    """A class name as a log key / TensorBoard tag component ("traffic light" -> "traffic_light")."""
    return str(name).replace(" ", "_").replace("/", "_")


class PerClassMetricsLogger(keras.callbacks.Callback):
    """After each epoch with validation, print a per-class table and log the per-class values.

    Reads the confusion matrix that a compiled `ConfusionMatrixMetric` (e.g. `MeanIoU`) holds
    once Keras' validation has run, and:
    - prints a `Class | IoU | Acc` table (in %) with aAcc / mIoU / mAcc, MMSegmentation-style;
    - adds `val_iou/<class>`, `val_acc/<class>`, `val_mean_accuracy` and, for the 19 Cityscapes
      trainId classes, `val_category_miou` to the epoch's `logs`, so that `History` and
      `CSVLogger` record them (list this callback before `CSVLogger`);
    - writes the same values with `tf.summary` under `<log_dir>/validation` when `log_dir` is given
      (the run directory that `keras.callbacks.TensorBoard` writes to).

    Args:
        class_names: list of str. One name per class, in class-index order.
        metric: the `ConfusionMatrixMetric` passed to `compile`; None finds the first compiled one.
        log_dir: str or None. TensorBoard run directory.
        categories: bool or None. Also report the Cityscapes category mIoU; None: when
            `class_names` are the 19 Cityscapes trainId classes.
        print_fn: callable taking a string, or None to print nothing.

    Example:

    ```python
    miou = MeanIoU(num_classes=19)
    model.compile(optimizer="adam", loss=CrossEntropyLoss(), metrics=[miou])
    model.fit(train, validation_data=val, callbacks=[PerClassMetricsLogger(class_names, miou, "runs/x")])
    ```
    """

    def __init__(self, class_names, metric=None, log_dir=None, categories=None, print_fn=print):
        super().__init__()
        self.class_names = [str(n) for n in class_names]
        self.metric = metric
        self.log_dir = log_dir
        if categories and len(self.class_names) != 19:
            raise ValueError(f"categories=True needs the 19 Cityscapes trainId classes, got {len(self.class_names)}")
        if categories is None:
            categories = seg_metrics.is_cityscapes_trainid(len(self.class_names), self.class_names)
        self.categories = bool(categories)
        self.print_fn = print_fn
        self._writer = None

    def _find_metric(self):
        pending = list(self.model.metrics)
        while pending:
            metric = pending.pop(0)
            if isinstance(metric, seg_metrics.ConfusionMatrixMetric):
                return metric
            pending.extend(getattr(metric, "metrics", []))
        raise ValueError("PerClassMetricsLogger: no ConfusionMatrixMetric (e.g. MeanIoU) among the compiled metrics")

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        metric = self.metric if self.metric is not None else self._find_metric()
        if f"val_{metric.name}" not in logs:
            return  # no validation this epoch: the matrix holds training counts
        cm = metric.confusion_matrix()
        if len(self.class_names) != metric.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for a {metric.num_classes}-class metric")

        values = {}
        for name, iou, acc in zip(self.class_names, seg_metrics.per_class_iou(cm), seg_metrics.per_class_accuracy(cm)):
            values[f"iou/{_key(name)}"] = float(iou)
            values[f"acc/{_key(name)}"] = float(acc)
        values["mean_accuracy"] = seg_metrics.mean_accuracy(cm)
        if self.categories:
            values["category_miou"] = seg_metrics.category_mean_iou(cm)
        logs.update({f"val_{key}": value for key, value in values.items()})

        if self.print_fn is not None:
            report = seg_metrics.format_table(cm, self.class_names)
            if self.categories:
                report += f"\nCityscapes category mIoU {100 * values['category_miou']:.2f}"
            self.print_fn(f"per-class results, epoch {epoch + 1}:\n{report}")
        if self.log_dir:
            self._write_summaries(values, epoch)

    def _write_summaries(self, values, epoch):
        import tensorflow as tf  # only when logging to TensorBoard
        from tensorflow.core.framework import summary_pb2

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "validation"))
        # What tf.summary.scalar writes, without needing the tensorboard package installed.
        scalar = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
            data_class=summary_pb2.DATA_CLASS_SCALAR,
        )
        with self._writer.as_default():
            for key, value in values.items():
                if not np.isnan(value):
                    tf.summary.write(f"epoch_{key}", tf.constant(value, tf.float32), step=epoch, metadata=scalar)
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
