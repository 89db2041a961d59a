"""Pictures a person reads faster than numbers: colour-coded masks, overlays, sample grids."""

from __future__ import annotations

import cv2
import numpy as np

from keras_seg.labels import IGNORE_INDEX

IGNORE_COLOR = (0, 0, 0)


def palette_table(class_colors) -> np.ndarray:
    """[256, 3] uint8 lookup table: class index -> colour, ignore (and unknown) -> black."""
    table = np.zeros((256, 3), np.uint8)
    table[: len(class_colors)] = np.asarray(class_colors, np.uint8)
    table[IGNORE_INDEX] = IGNORE_COLOR
    return table


def colorize(mask: np.ndarray, class_colors) -> np.ndarray:
    """Class-index mask [H, W] -> RGB uint8 [H, W, 3]."""
    return palette_table(class_colors)[np.asarray(mask, np.uint8)]


def overlay(image: np.ndarray, mask: np.ndarray, class_colors, alpha: float = 0.5) -> np.ndarray:
    """The colour-coded mask blended over the photo (ignored pixels show the photo)."""
    image = _to_uint8(image)
    colors = colorize(mask, class_colors)
    blended = (image.astype(np.float32) * (1 - alpha) + colors.astype(np.float32) * alpha).astype(np.uint8)
    return np.where((np.asarray(mask) == IGNORE_INDEX)[..., None], image, blended)


def panel(columns, gap: int = 4) -> np.ndarray:
    """Images of one height side by side, with white gaps."""
    height = columns[0].shape[0]
    spacer = np.full((height, gap, 3), 255, np.uint8)
    parts = []
    for i, column in enumerate(columns):
        if i:
            parts.append(spacer)
        parts.append(_to_uint8(column))
    return np.concatenate(parts, axis=1)


def prediction_grid(images, masks, predictions, class_colors, gap: int = 4) -> np.ndarray:
    """One row per sample: image | ground truth | prediction, colour-coded."""
    rows = [
        panel([image, colorize(mask, class_colors), colorize(pred, class_colors)], gap)
        for image, mask, pred in zip(images, masks, predictions)
    ]
    spacer = np.full((gap, rows[0].shape[1], 3), 255, np.uint8)
    out = []
    for i, row in enumerate(rows):
        if i:
            out.append(spacer)
        out.append(row)
    return np.concatenate(out, axis=0)


def save_png(path: str, rgb: np.ndarray):
    if not cv2.imwrite(str(path), cv2.cvtColor(_to_uint8(rgb), cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: could not write the PNG")


def _to_uint8(image) -> np.ndarray:
    """uint8 as it is; floating point images are in [0, 1] (the pipeline's convention)."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return np.clip(image.astype(np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
