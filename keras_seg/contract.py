"""The inference contract: how a run's model infers a whole image, written down once and followed everywhere.

Training's validation, `evaluate` (by default), `predict` and every signature of an export infer
a whole image the same way, recorded under the key "inference" of the run's `config.json` and of
the export's `assets/labels.json`:

    "resize"      how the whole image is rescaled first:
                    "stretch"     to exactly `scale` (aspect not kept): runs trained with
                                  --resize-mode resize;
                    "keep_ratio"  aspect kept, as MMSegmentation's `keep_ratio`: long side at most
                                  max(scale), short side at most min(scale) (--resize-mode fit,
                                  scale_crop);
                    "none"        kept at its own resolution (--resize-mode crop)
    "scale"       [H, W], or null with "none"
    "mode"        "whole": the rescaled image in one model call, padded at the bottom / right to
                  the model's input size when smaller; "slide": windows of the model's input size
    "input_size"  [h, w], the model's input (the rescaled image's box for "whole", the training
                  crop for "slide")
    "overlap"     share of a window that its neighbour covers again (MMSegmentation's slide
                  inference: 1/3); also used when a "whole" image exceeds the input size

The softmax probabilities of the windows are averaged where they overlap and resized (bilinear)
back to the image's own size, where predictions are scored. `contract_probabilities` is that
computation in TensorFlow ops, traced into the export's signatures and run by the trainer and the
command-line tools alike, with optional flip and multi-scale averaging (`evaluate --tta`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import tensorflow as tf

RESIZES = ("stretch", "keep_ratio", "none")
MODES = ("whole", "slide")
DEFAULT_OVERLAP = 1 / 3
TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # MMSegmentation's multi-scale test ratios


class ContractError(ValueError):
    """An inference contract that cannot be followed, in one line."""


@dataclasses.dataclass(frozen=True)
class InferenceContract:
    resize: str
    scale: Optional[tuple]
    mode: str
    input_size: tuple
    overlap: float = DEFAULT_OVERLAP

    def __post_init__(self):
        if self.resize not in RESIZES:
            raise ContractError(f"inference resize must be one of {RESIZES}, got {self.resize!r}")
        if self.mode not in MODES:
            raise ContractError(f"inference mode must be one of {MODES}, got {self.mode!r}")
        if (self.scale is None) != (self.resize == "none"):
            raise ContractError(f"inference scale must be given exactly when resize is not 'none' (resize "
                                f"{self.resize!r}, scale {self.scale})")
        if not 0.0 <= self.overlap < 1.0:
            raise ContractError(f"inference overlap must be in [0, 1), got {self.overlap}")
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        if self.scale is not None:
            object.__setattr__(self, "scale", tuple(int(v) for v in self.scale))

    def to_dict(self) -> dict:
        return {"resize": self.resize, "scale": list(self.scale) if self.scale else None, "mode": self.mode,
                "input_size": list(self.input_size), "overlap": self.overlap}

    @classmethod
    def from_dict(cls, values: dict, source="inference") -> InferenceContract:
        try:
            return cls(values["resize"], values.get("scale"), values["mode"], values["input_size"],
                       float(values.get("overlap", DEFAULT_OVERLAP)))
        except (KeyError, TypeError) as err:
            raise ContractError(f"{source}: not an inference contract ({err})") from err

    def describe(self) -> str:
        scale = {"stretch": f"stretched to {self.scale[0]}x{self.scale[1]}" if self.scale else "",
                 "keep_ratio": f"resized to fit {self.scale[0]}x{self.scale[1]} (aspect kept)" if self.scale else "",
                 "none": "at its own resolution"}[self.resize]
        how = (f"whole, model input {self.input_size[0]}x{self.input_size[1]}" if self.mode == "whole" else
               f"sliding {self.input_size[0]}x{self.input_size[1]} windows, overlap {self.overlap:.2f}")
        return f"whole image {scale}; {how}"


def for_training(resize_mode: str, image_size, base_scale=None, mode: Optional[str] = None,
                 overlap: float = DEFAULT_OVERLAP) -> InferenceContract:
    """The contract of a run trained with `resize_mode` at `image_size` (see `keras_seg.data`).

    `mode` ("whole" / "slide") applies to "scale_crop" runs (default "slide"), whose model trains on
    crops of the rescaled image: "whole" infers the whole rescaled image at once, at `base_scale`.
    """
    image_size = tuple(int(v) for v in image_size)
    if resize_mode == "resize":
        return InferenceContract("stretch", image_size, "whole", image_size, overlap)
    if resize_mode == "fit":
        return InferenceContract("keep_ratio", image_size, "whole", image_size, overlap)
    if resize_mode == "crop":
        return InferenceContract("none", None, "slide", image_size, overlap)
    if resize_mode == "scale_crop":
        if base_scale is None:
            raise ContractError("resize mode scale_crop needs a base scale")
        mode = mode or "slide"
        return InferenceContract("keep_ratio", tuple(base_scale), mode,
                                 tuple(base_scale) if mode == "whole" else image_size, overlap)
    raise ContractError(f"unknown resize mode {resize_mode!r}")


def override(contract: InferenceContract, mode=None, tile=None, overlap=None) -> InferenceContract:
    """The contract with evaluate's / predict's `--inference`, `--tile`, `--overlap` applied."""
    mode = mode or contract.mode
    input_size = contract.input_size
    if mode != contract.mode:
        if mode == "whole":
            if contract.scale is None:
                raise ContractError("--inference whole needs a scale, and this model infers images at their own "
                                    "resolution (trained with --resize-mode crop)")
            input_size = contract.scale
        elif tile is None:
            raise ContractError("--inference slide on a model that infers whole images: give the window, --tile HxW")
    if tile is not None:
        input_size = tuple(tile)
    return dataclasses.replace(contract, mode=mode, input_size=input_size,
                               overlap=contract.overlap if overlap is None else float(overlap))


# --------------------------------------------------------------------------- TensorFlow


def rescaled_size(height, width, contract: InferenceContract, ratio: float = 1.0):
    """int32 [2]: the size the whole image is rescaled to, before windows; `ratio` multiplies the scale."""
    if contract.resize == "keep_ratio":
        return keep_ratio_size(height, width, contract.scale, ratio)
    if contract.resize == "none":
        target = tf.cast(tf.stack([height, width]), tf.float32) * ratio
    else:
        target = tf.constant(contract.scale, tf.float32) * ratio
    return tf.maximum(tf.cast(tf.round(target), tf.int32), 1)


def keep_ratio_size(height, width, scale, ratio=1.0):
    """int32 [2]: (height, width) scaled, aspect kept, so that the long side is at most max(scale) x ratio
    and the short side at most min(scale) x ratio (MMSegmentation's `keep_ratio` rescale)."""
    size = tf.cast(tf.stack([height, width]), tf.float32)
    long_side, short_side = max(scale) * ratio, min(scale) * ratio
    factor = tf.minimum(long_side / tf.reduce_max(size), short_side / tf.reduce_min(size))
    return tf.maximum(tf.cast(tf.round(size * factor), tf.int32), 1)


def resize_uint8(images, size):
    """uint8 [N, H, W, 3] or [H, W, 3] -> uint8 at `size` (bilinear, antialiased, rounded): how the
    training reader resizes (`keras_seg.data`) and how inference rescales; untouched when already
    at that size."""
    shape = tf.shape(images)[-3:-1]

    def resize():
        resized = tf.image.resize(images, size, method="bilinear", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)

    return tf.cond(tf.logical_and(shape[0] == size[0], shape[1] == size[1]), lambda: images, resize)


def window_offsets(length, tile: int, stride: int):
    """int32 [K]: starts of windows of `tile` covering `length` by `stride`; the last ends at the edge (or [0])."""
    room = tf.maximum(length - tile, 0)
    count = (room + stride - 1) // stride + 1
    return tf.minimum(tf.range(count) * stride, room)


def window_probabilities(images, model_fn: Callable, input_size, overlap: float, num_classes: int):
    """Softmax [N, H, W, C] of uint8 images [N, H, W, 3] from windows of `input_size`.

    Images smaller than a window are padded with black at the bottom / right; the padding's
    probabilities are dropped. Overlapping windows' probabilities are averaged.
    """
    tile_h, tile_w = (int(v) for v in input_size)
    stride_h, stride_w = (max(1, int(round(t * (1.0 - overlap)))) for t in (tile_h, tile_w))
    shape = tf.shape(images)
    height, width = shape[1], shape[2]
    padded_h, padded_w = tf.maximum(height, tile_h), tf.maximum(width, tile_w)
    images = tf.pad(images, [[0, 0], [0, padded_h - height], [0, padded_w - width], [0, 0]])
    rows = window_offsets(padded_h, tile_h, stride_h)
    cols = window_offsets(padded_w, tile_w, stride_w)
    count_x = tf.size(cols)

    def add_window(k, total, hits):
        y, x = rows[k // count_x], cols[k % count_x]
        window = tf.ensure_shape(images[:, y:y + tile_h, x:x + tile_w], [None, tile_h, tile_w, 3])
        probabilities = tf.cast(model_fn(tf.cast(window, tf.float32) / 255.0), tf.float32)
        where = [[y, padded_h - y - tile_h], [x, padded_w - x - tile_w]]
        total += tf.pad(probabilities, [[0, 0], *where, [0, 0]])
        hits += tf.pad(tf.ones([tile_h, tile_w, 1]), [*where, [0, 0]])
        return k + 1, total, hits

    total = tf.zeros([shape[0], padded_h, padded_w, num_classes])
    hits = tf.zeros([padded_h, padded_w, 1])
    _, total, hits = tf.while_loop(lambda k, *_: k < tf.size(rows) * count_x, add_window,
                                   (tf.constant(0), total, hits))
    return (total / hits)[:, :height, :width]


def contract_probabilities(images, model_fn: Callable, contract: InferenceContract, num_classes: int,
                           flip: bool = False, scales=(1.0,)):
    """float32 softmax [N, H, W, C] of uint8 images [N, H, W, 3] (one size), at the images' own size.

    For each ratio in `scales`: the image rescaled by the contract (scale x ratio), with its mirror
    image too when `flip`, inferred by windows of the model's input size; the mirror's
    probabilities are flipped back; everything is resized to the image's size and averaged.

    Args:
        model_fn: float32 images [n, h, w, 3] in [0, 1] at `contract.input_size` -> softmax [n, h, w, C].
    """
    images = tf.convert_to_tensor(images, tf.uint8)
    shape = tf.shape(images)
    count, height, width = shape[0], shape[1], shape[2]
    summed = None
    for ratio in scales:
        rescaled = resize_uint8(images, rescaled_size(height, width, contract, ratio))
        batch = tf.concat([rescaled, tf.reverse(rescaled, axis=[2])], axis=0) if flip else rescaled
        probabilities = window_probabilities(batch, model_fn, contract.input_size, contract.overlap, num_classes)
        if flip:
            probabilities = (probabilities[:count] + tf.reverse(probabilities[count:], axis=[2])) / 2.0
        same = tf.logical_and(tf.shape(probabilities)[1] == height, tf.shape(probabilities)[2] == width)
        probabilities = tf.cond(same, lambda p=probabilities: p,
                                lambda p=probabilities: tf.image.resize(p, [height, width], method="bilinear"))
        summed = probabilities if summed is None else summed + probabilities
    return summed / float(len(scales))


def keras_model_fn(model):
    """A Keras model (float32 images in [0, 1] -> logits) as `contract_probabilities`' model_fn."""
    return lambda x: tf.nn.softmax(tf.cast(model(x, training=False), tf.float32), axis=-1)
