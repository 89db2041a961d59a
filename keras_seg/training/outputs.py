"""What a run writes into its directory, besides checkpoints (README, "A run directory").

config.json (with what the trainer resolved), dataset_info.json, timing.json, TensorBoard
summaries and pictures per validation, the best model with its metrics, and the final products:
last.keras, samples.png, the SavedModel export and report.html. The final products are written so
that one that fails costs only itself: a failed export still leaves the report, and the other way
round; each failure is one line in the log.
"""

from __future__ import annotations

import os
import time

import keras
import numpy as np
import tensorflow as tf

from keras_seg import data, metrics, tfrecord, visualize
from keras_seg.files import copy_atomically, write_json_atomically
from keras_seg.run_dir import RunDir, publish_best, read_best, save_model_atomically


def write_config(run_dir: RunDir, config):
    """config.json: the resolved config, `config.resolved` included."""
    write_json_atomically(run_dir.config, config.to_dict())


def copy_dataset_info(run_dir: RunDir, data_dir: str):
    """The data's dataset_info.json, byte for byte, beside the run's config (what the report reads)."""
    copy_atomically(os.path.join(data_dir, tfrecord.DATASET_INFO_NAME), run_dir.dataset_info)


def write_timing(run_dir: RunDir, timing: dict):
    write_json_atomically(os.path.join(run_dir.root, "timing.json"), timing)


class SamplePictures:
    """The first validation examples, read once, and the model's predictions on them as a picture
    (image | ground truth | prediction): in TensorBoard at every validation, samples.png at the end."""

    def __init__(self, config, val_split: str, class_colors, count: int = 6):
        self.config, self.val_split, self.class_colors, self.count = config, val_split, class_colors, count
        self._batch = None

    def batch(self):
        if self._batch is None:
            config = self.config
            images, masks = next(iter(data.build_dataset(
                config.data, self.val_split, training=False, batch_size=self.count,
                image_size=tuple(config.image_size), resize_mode=config.resize_mode, base_scale=config.base_scale)))
            self._batch = (images.numpy(), masks.numpy())
        return self._batch

    def grid(self, model, count):
        images, masks = (array[:count] for array in self.batch())
        logits = model(images, training=False)
        predictions = np.argmax(keras.ops.convert_to_numpy(logits), axis=-1)
        return visualize.prediction_grid(images, masks, predictions, self.class_colors)


def write_summaries(writer, step, row, result, class_names, pictures: SamplePictures, model):
    """TensorBoard: the history row's scalars, per-class IoU, category mIoU, the confusion matrix and
    the sample predictions."""
    with writer.as_default(step=step):
        for key in ("loss", "train_miou", "val_miou", "val_pixel_accuracy", "val_mean_dice", "learning_rate"):
            tf.summary.scalar(key, row[key])
        for name, iou in zip(class_names, result["per_class_iou"]):
            if not np.isnan(iou):
                tf.summary.scalar(f"val_iou/{name.replace(' ', '_')}", iou)
        if "category_miou" in result:
            tf.summary.scalar("val_category_miou", result["category_miou"])
        tf.summary.image("val_confusion_matrix",
                         visualize.confusion_matrix_image(result["confusion_matrix"], class_names)[None],
                         step=step, description="rows: ground truth, % of its pixels")
        tf.summary.image("val_samples", pictures.grid(model, 4)[None], step=step,
                         description="image | ground truth | prediction")


def save_best(run_dir: RunDir, model, step, epoch, result, class_names):
    """best.keras and its metrics (best_metrics.json, best_per_class_iou.txt), bound as one unit."""
    publish_best(run_dir, model, step, epoch, result, metrics.format_table(result["confusion_matrix"], class_names))


def score_images(inference_model, config, shape, batches, report_images):
    """The val split (its first `batches` val batches; None: all) scored as `evaluate` scores it,
    image by image: (metrics, the report's ImageScores of `report_images` worst and best images)."""
    from keras_seg import inference
    from keras_seg.report.collect import ImageScores
    from keras_seg.scoring import evaluate_split

    info = inference.model_info(config.to_dict(), shape.info)
    segmenter = inference.segmenter_from_model(inference_model, info)
    scores = ImageScores(report_images)
    limit = batches * shape.val_batch if batches else 0  # the images those batches held
    result = evaluate_split(segmenter, config.data, split=shape.val_split, batch_size=config.val_batch_size,
                            limit=limit, progress=False, on_image=scores)
    return result, scores


def best_summary(run_dir: RunDir) -> dict:
    best, _ = read_best(run_dir)
    return best or {}


def write_final_products(run_dir: RunDir, config, model, pictures: SamplePictures, log=print, timing=None,
                         before_report=None, scored=None, limit=0):
    """last.keras, samples.png (from the best model), the SavedModel export and report.html.

    A failed export costs only itself: it is said in one line, and the report is written all the
    same. `timing` gets the export's seconds; `before_report()` runs just before the report is drawn
    (the trainer closes timing.json there); `scored` and `limit` go to the report (`write_report`)."""
    save_model_atomically(model, run_dir.last_model)
    if os.path.exists(run_dir.best_model):
        best = keras.saving.load_model(run_dir.best_model, compile=False)
        model.set_weights(best.get_weights())
    visualize.save_png(run_dir.samples, pictures.grid(model, 6))
    if config.export and os.path.exists(run_dir.best_model):
        started = time.perf_counter()
        export_run(run_dir, log)
        if timing is not None:
            timing["export_seconds"] = time.perf_counter() - started
    if before_report is not None:
        before_report()
    write_report(run_dir, log, scored=scored, limit=limit)


def export_run(run_dir: RunDir, log=print):
    """RUN/saved_model/NAME/1 from best.keras; a failure says why in one line and how to try again."""
    from keras_seg.export import export_saved_model

    try:
        export_saved_model(run_dir.root, run_dir.saved_model, version=1, overwrite=True, log=log)
    except Exception as err:  # noqa: BLE001 - the run's models are written: the report must still come
        why = (str(err).strip().splitlines() or [""])[0]
        log(f"export: not written ({type(err).__name__}: {why}); export it with python -m keras_seg.export "
            f"--run {run_dir.root} --output DIR")


def write_report(run_dir: RunDir, log=print, scored=None, limit=0):
    """RUN/report.html, from the best model's image scores when given (`scored`), else scoring it on the
    val split (its first `limit` images); a report that fails says why in one line and leaves the run as it is."""
    try:
        from keras_seg.report import write_run_report  # draws with matplotlib: imported only here

        log(f"report: {write_run_report(run_dir.root, scored=scored, limit=limit)}")
    except Exception as err:  # noqa: BLE001 - the models and checkpoints are written: the run stands
        why = (str(err).strip().splitlines() or [""])[0]
        log(f"report: not written ({type(err).__name__}: {why}); rebuild it with "
            f"python -m keras_seg.report {run_dir.root}")


def damaged_data_error(err, config, val_split, latest_checkpoint):
    """A one-line DatasetFormatError for a read that failed mid-run: what is damaged (a --cache file, to
    delete, or the damaged shard, found by scanning the shards now, only on error) and how to go on."""
    found = data.damaged_data(config.data, ["train", val_split], err, cache=config.cache)
    if latest_checkpoint is None:
        then = "no checkpoint was saved yet: start the run again"
    else:
        then = (f"then --resume --output {config.output} continues from the last checkpoint "
                f"(step {latest_checkpoint.rsplit('-', 1)[-1]})")
    return tfrecord.DatasetFormatError(f"{found}; {then}")
