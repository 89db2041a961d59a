"""Pictures a person reads faster than numbers: colour-coded masks, overlays, sample grids, confusion matrices."""

from __future__ import annotations

import os

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


# --------------------------------------------------------------------------- confusion matrix

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_EMPTY_ROW_COLOR = (225, 225, 225)
_HEAT_HIGH = np.array([8, 48, 107], np.float32)  # dark blue for 100 %


def _text_width(text: str, scale: float) -> int:
    return cv2.getTextSize(text, _FONT, scale, 1)[0][0]


def _name_strip(names, cell: int, width: int, scale: float) -> np.ndarray:
    """Names one per `cell`-high row, left-aligned on white, [len(names) * cell, width, 3]."""
    strip = np.full((len(names) * cell, width, 3), 255, np.uint8)
    for i, name in enumerate(names):
        cv2.putText(strip, name, (4, i * cell + cell // 2 + 4), _FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def confusion_matrix_image(cm, class_names, cell: int = 28, title: str | None = None) -> np.ndarray:
    """A confusion matrix as a picture: RGB uint8, rows ground truth, columns prediction.

    Each row is normalised by its ground-truth pixels, so a cell shows the percentage of class
    `row`'s pixels predicted as `column` (the diagonal is the per-class accuracy), as a white ->
    blue shade with the rounded percentage written in (blank below 0.5 %). Rows of classes absent
    from the ground truth are grey.

    Args:
        cm: [C, C] counts, `cm[true, predicted]` (as `keras_seg.metrics.confusion_matrix`).
        class_names: C names, written along both axes.
        cell: side of one cell in pixels.
        title: optional line above the matrix.
    """
    cm = np.asarray(cm, np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(class_names):
        raise ValueError(f"a [C, C] matrix and C class names are needed, got {cm.shape} and {len(class_names)} names")
    count = len(class_names)
    scale = 0.4
    rows = cm.sum(axis=1, keepdims=True)
    shares = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)

    grid = np.empty((count * cell, count * cell, 3), np.uint8)
    for t in range(count):
        for p in range(count):
            share = shares[t, p]
            color = _EMPTY_ROW_COLOR if rows[t, 0] == 0 else \
                tuple(int(v) for v in (255.0 * (1 - share) + _HEAT_HIGH * share).round())
            y, x = t * cell, p * cell
            grid[y:y + cell, x:x + cell] = color
            if rows[t, 0] and share >= 0.005:
                text = f"{100 * share:.0f}"
                ink = (255, 255, 255) if share > 0.5 else (0, 0, 0)
                origin = (x + (cell - _text_width(text, scale)) // 2, y + cell // 2 + 4)
                cv2.putText(grid, text, origin, _FONT, scale, ink, 1, cv2.LINE_AA)
    grid[::cell, :] = grid[:, ::cell] = 255  # thin white lines between cells

    label_width = max(_text_width(str(n), scale) for n in class_names) + 10
    left = _name_strip([str(n) for n in class_names], cell, label_width, scale)
    top = np.rot90(_name_strip([str(n) for n in class_names], cell, label_width, scale)).copy()

    axis = 18  # the "prediction" / "ground truth" captions
    heading = 22 if title else 0
    height = heading + axis + label_width + count * cell + 6
    width = axis + label_width + count * cell + 6
    canvas = np.full((height, width, 3), 255, np.uint8)
    y0, x0 = heading + axis + label_width, axis + label_width
    canvas[y0:y0 + count * cell, x0:x0 + count * cell] = grid
    canvas[y0:y0 + count * cell, axis:axis + label_width] = left
    canvas[heading + axis:y0, x0:x0 + count * cell] = top
    if title:
        cv2.putText(canvas, title, (4, 16), _FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(canvas, "prediction", (x0, heading + 13), _FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    caption = np.full((axis, count * cell, 3), 255, np.uint8)
    caption_x = max(4, (count * cell - _text_width("ground truth", 0.45)) // 2)
    cv2.putText(caption, "ground truth", (caption_x, 13), _FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    canvas[y0:y0 + count * cell, :axis] = np.rot90(caption)
    return canvas


def save_png_atomically(path: str, image: np.ndarray):
    """Write an RGB [H, W, 3] or single-channel [H, W] uint8 PNG under a temporary name, then rename."""
    from keras_seg.files import publish, temp_path_beside

    image = np.asarray(image)
    tmp = temp_path_beside(path, suffix=".png")  # OpenCV picks the format by the suffix
    try:
        if image.ndim == 2:
            if not cv2.imwrite(tmp, image.astype(np.uint8)):
                raise OSError(f"{path}: could not write the PNG")
        else:
            save_png(tmp, image)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
