"""Scoring a segmenter on a converted split: one confusion matrix over every image of it.

`evaluate_split` is what `python -m keras_seg.evaluate` and the run report (`keras_seg.report`)
both score with; it lives here, apart from either, so that neither imports the other.
"""

from __future__ import annotations

import time

import numpy as np


class EvaluationError(ValueError):
    """A bad argument or a model and data that do not fit, said in one line."""


def check_label_spaces(segmenter, info, data_dir):
    """The model predicts the classes the data is labelled with."""
    model_names = [str(n) for n in segmenter.class_names]
    data_names = [str(n) for n in info.get("class_names", [])]
    if segmenter.num_classes != int(info["num_classes"]) or (data_names and model_names != data_names):
        raise EvaluationError(
            f"the model predicts {segmenter.num_classes} classes ({segmenter.label_space}), the data in {data_dir} "
            f"has {info['num_classes']} ({info.get('label_space')}): not the same label space")


def evaluate_split(segmenter, data_dir, split=None, flip=False, scales=(1.0,), batch_size=4, limit=0,
                   progress=True, on_image=None) -> dict:
    """The confusion matrix and metrics of `segmenter` on a split, at the original resolution.

    Args:
        segmenter: a `keras_seg.inference.Segmenter`; its inference contract is followed.
        data_dir: a directory written by `tools/make_tfrecords.py`.
        split: split name (default: "val", or TFDS' "validation").
        flip: average with the mirror image's probabilities.
        scales: scale ratios to average over (multi-scale testing); (1.0,): the contract's scale only.
        batch_size: images per model call when the split's images share one size (else 1).
        limit: evaluate only the first `limit` images (0: all).
        progress: show a progress bar.
        on_image: called as `on_image(image, mask, prediction, confusion_matrix)` for every image
            (uint8 RGB, class ids, that image's matrix): the run report's worst and best images.

    Returns:
        `keras_seg.metrics.summarize_confusion`'s dict, plus `images`, `seconds` and `split`.
    """
    from tqdm import tqdm

    from keras_seg import data, metrics, tfrecord

    info = tfrecord.load_dataset_info(data_dir)
    check_label_spaces(segmenter, info, data_dir)
    split = split or tfrecord.validation_split(info) or "val"
    if split not in info["splits"]:
        raise EvaluationError(f"{data_dir}: no split {split!r} (it has: {sorted(info['splits'])})")
    total = int(info["splits"][split].get("num_examples", 0)) or None
    if limit:
        total = min(total or limit, limit)
    one_size = tfrecord.has_one_image_size(info, split)
    dataset = data.build_dataset(data_dir, split, training=False, batch_size=batch_size if one_size else 1,
                                 image_size=None, prefetch=2)
    num_classes = segmenter.num_classes
    cm = np.zeros((num_classes, num_classes), np.int64)
    count = 0
    started = time.perf_counter()
    with tqdm(total=total, unit="img", desc=f"evaluate {split}", disable=not progress) as bar:
        for images, masks in dataset:
            # The reader's floats are uint8 / 255: rounding gives the bytes back exactly.
            images = np.rint(images.numpy() * 255.0).astype(np.uint8)
            masks = masks.numpy()
            if limit:
                images, masks = images[:limit - count], masks[:limit - count]
            probabilities = segmenter.probabilities(images, flip, scales)
            predictions = np.argmax(probabilities.numpy(), axis=-1)
            for image, mask, prediction in zip(images, masks, predictions):
                image_cm = metrics.confusion_matrix(mask, prediction, num_classes, info.get("ignore_index", 255))
                cm += image_cm
                if on_image is not None:
                    on_image(image, mask, prediction, image_cm)
            count += len(images)
            bar.update(len(images))
            if limit and count >= limit:
                break
    if count == 0:
        raise EvaluationError(f"{data_dir}: split {split!r} has no examples")
    summary = metrics.summarize_confusion(cm, segmenter.class_names, segmenter.label_space)
    summary.update(images=count, seconds=time.perf_counter() - started, split=split)
    return summary
