"""An independent rendering of the inference contract (docs/evaluation.md), for tests to compare against.

Written from the contract's description with numpy loops and TensorFlow's resize ops, not from
keras_seg.contract's graph.
"""

import numpy as np
import tensorflow as tf


def numpy_confusion(masks, predictions, num_classes=19):
    """Reference confusion matrix, counted pixel by pixel with np.add.at (255 not counted)."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    for mask, prediction in zip(masks, predictions):
        valid = mask != 255
        np.add.at(cm, (mask[valid].astype(np.int64), prediction[valid].astype(np.int64)), 1)
    return cm


def keras_probabilities(model):
    """The checkpoint's softmax on float32 images in [0, 1], computed here, outside keras_seg."""
    return lambda x: tf.nn.softmax(model(np.asarray(x, np.float32), training=False)).numpy()


def reference_probabilities(image, model_fn, resize, scale, window, overlap=1 / 3, flip=False, scales=(1.0,),
                            size_divisor=None):
    """An independent numpy/TF-op rendering of the inference contract (docs/evaluation.md) for one image.

    For each ratio: rescale (stretch to scale x r, keep the ratio within scale x r, or r x the image's
    own size), run windows of `window` (bottom/right padded with black) stepping by window x (1 - overlap),
    the last at the edge, average overlaps; average with the mirror image flipped back; resize the
    softmax back to the image's size (bilinear); average over the ratios. With `size_divisor` (a "whole"
    contract that records one), each ratio's image is one window of its own size rounded up to a multiple
    of it, instead of `window`.
    """
    height, width = image.shape[:2]
    total = np.zeros((height, width, 0))
    for ratio in scales:
        if resize == "stretch":
            size = (round(scale[0] * ratio), round(scale[1] * ratio))
        elif resize == "none":
            size = (round(height * ratio), round(width * ratio))
        elif resize == "fit":  # inside the box (H, W) x ratio, orientation as given
            box = (scale[0] * ratio, scale[1] * ratio)
            factor = min(box[0] / height, box[1] / width)
            size = (min(round(height * factor), round(box[0])), min(round(width * factor), round(box[1])))
        else:
            factor = min(max(scale) * ratio / max(height, width), min(scale) * ratio / min(height, width))
            size = (round(height * factor), round(width * factor))
        x = image
        if size != (height, width):
            x = tf.image.resize(image, size, method="bilinear", antialias=True).numpy()
            x = np.clip(np.round(x), 0, 255).astype(np.uint8)
        views = [x, x[:, ::-1]] if flip else [x]
        averaged = 0
        for k, view in enumerate(views):
            own = [-(-side // size_divisor) * size_divisor for side in view.shape[:2]] if size_divisor else window
            p = numpy_slide(view, model_fn, own, overlap, centre=resize == "fit")
            averaged = averaged + (p[:, ::-1] if k else p)
        averaged = averaged / len(views)
        if averaged.shape[:2] != (height, width):
            averaged = tf.image.resize(averaged, (height, width), method="bilinear").numpy()
        total = averaged if total.size == 0 else total + averaged
    return total / len(scales)


def numpy_slide(image, model_fn, window, overlap, centre=False):
    """Windows over the image padded with black to at least `window`: at the bottom/right, or
    `centre`d (half each side, the odd pixel after), as the "fit" letterbox of training pads."""
    height, width = image.shape[:2]
    padded_h, padded_w = max(height, window[0]), max(width, window[1])
    top, left = ((padded_h - height) // 2, (padded_w - width) // 2) if centre else (0, 0)
    padded = np.zeros((padded_h, padded_w, 3), np.uint8)
    padded[top:top + height, left:left + width] = image
    steps = [max(1, round(t * (1 - overlap))) for t in window]
    rows = sorted(set(list(range(0, padded_h - window[0], steps[0])) + [padded_h - window[0]]))
    cols = sorted(set(list(range(0, padded_w - window[1], steps[1])) + [padded_w - window[1]]))
    total, hits = None, np.zeros((padded_h, padded_w, 1))
    for y in rows:
        for x in cols:
            p = model_fn(padded[None, y:y + window[0], x:x + window[1]] / 255.0)[0]
            if total is None:
                total = np.zeros((padded_h, padded_w, p.shape[-1]))
            total[y:y + window[0], x:x + window[1]] += p
            hits[y:y + window[0], x:x + window[1]] += 1
    return (total / hits)[top:top + height, left:left + width]
