"""The inference contract: how a run's model infers a whole image, written down once and followed everywhere.

Training's validation, `evaluate` (by default), `predict` and every signature of an export infer
a whole image the same way, recorded under the key "inference" of the run's `config.json` and of
the export's `assets/labels.json`:

    "resize"      how the whole image is rescaled first:
                    "stretch"     to exactly `scale` (aspect not kept): runs trained with
                                  --resize-mode resize;
                    "keep_ratio"  aspect kept, as MMSegmentation's `keep_ratio`: long side at most
                                  max(scale), short side at most min(scale) (--resize-mode scale_crop);
                    "fit"         aspect kept, fitted inside the [H, W] box (its orientation counts)
                                  and padded centred to it, as --resize-mode fit trains (`fit_size`);
                    "none"        kept at its own resolution (--resize-mode crop)
    "scale"       [H, W], or null with "none"
    "mode"        "whole": the rescaled image in one model call, padded at the bottom / right to
                  the model's input size when smaller (centred with "fit"); "slide": windows of the
                  model's input size
    "input_size"  [h, w], the model's input (the rescaled image's box for "whole", the training
                  crop for "slide")
    "overlap"     share of a window that its neighbour covers again (MMSegmentation's slide
                  inference: 1/3); also used when a "whole" image exceeds the input size
    "size_divisor" ("whole" only; absent in contracts recorded before it) the model takes any size
                  that is a multiple of it: the rescaled image (with "fit", its box scale x ratio)
                  is padded only up to that multiple and inferred in one call at every TTA ratio,
                  as MMSegmentation's whole inference, instead of padded to, or slid over by,
                  the input size

The softmax probabilities of the windows are averaged where they overlap and resized (bilinear)
back to the image's own size, where predictions are scored. `contract_probabilities` is that
computation in TensorFlow ops, traced into the export's signatures and run by the trainer and the
command-line tools alike, with optional flip and multi-scale averaging (`evaluate --tta`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import tensorflow as tf

RESIZES = ("stretch", "keep_ratio", "fit", "none")
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
    size_divisor: Optional[int] = None

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
        if self.size_divisor is not None and (self.mode != "whole" or int(self.size_divisor) < 1):
            raise ContractError(f"inference size_divisor applies to mode 'whole' and must be positive, got "
                                f"{self.size_divisor} with mode {self.mode!r}")
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        if self.scale is not None:
            object.__setattr__(self, "scale", tuple(int(v) for v in self.scale))

    def to_dict(self) -> dict:
        return {"resize": self.resize, "scale": list(self.scale) if self.scale else None, "mode": self.mode,
                "input_size": list(self.input_size), "overlap": self.overlap,
                **({"size_divisor": self.size_divisor} if self.size_divisor else {})}

    @classmethod
    def from_dict(cls, values: dict, source="inference") -> InferenceContract:
        try:
            divisor = values.get("size_divisor")
            return cls(values["resize"], values.get("scale"), values["mode"], values["input_size"],
                       float(values.get("overlap", DEFAULT_OVERLAP)), int(divisor) if divisor else None)
        except (KeyError, TypeError) as err:
            raise ContractError(f"{source}: not an inference contract ({err})") from err

    def describe(self) -> str:
        scale = {"stretch": f"stretched to {self.scale[0]}x{self.scale[1]}" if self.scale else "",
                 "keep_ratio": f"resized to fit {self.scale[0]}x{self.scale[1]} (aspect kept)" if self.scale else "",
                 "fit": f"fitted inside {self.scale[0]}x{self.scale[1]} (aspect kept, padded centred)"
                 if self.scale else "",
                 "none": "at its own resolution"}[self.resize]
        how = (f"whole, model input {self.input_size[0]}x{self.input_size[1]}" if self.mode == "whole" else
               f"sliding {self.input_size[0]}x{self.input_size[1]} windows, overlap {self.overlap:.2f}")
        return f"whole image {scale}; {how}"


def for_training(resize_mode: str, image_size, base_scale=None, mode: Optional[str] = None,
                 overlap: float = DEFAULT_OVERLAP, size_divisor: Optional[int] = None) -> InferenceContract:
    """The contract of a run trained with `resize_mode` at `image_size` (see `keras_seg.data`).

    `mode` ("whole" / "slide") applies to "scale_crop" runs (default "slide"), whose model trains on
    crops of the rescaled image: "whole" infers the whole rescaled image at once, at `base_scale`.
    `size_divisor` (the model's total stride) goes into the "whole" contracts: see the module docstring.
    """
    image_size = tuple(int(v) for v in image_size)
    if resize_mode == "resize":
        return InferenceContract("stretch", image_size, "whole", image_size, overlap, size_divisor)
    if resize_mode == "fit":
        return InferenceContract("fit", image_size, "whole", image_size, overlap, size_divisor)
    if resize_mode == "crop":
        return InferenceContract("none", None, "slide", image_size, overlap)
    if resize_mode == "scale_crop":
        if base_scale is None:
            raise ContractError("resize mode scale_crop needs a base scale")
        mode = mode or "slide"
        return InferenceContract("keep_ratio", tuple(base_scale), mode,
                                 tuple(base_scale) if mode == "whole" else image_size, overlap,
                                 size_divisor if mode == "whole" else None)
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
    # A changed mode or window: the model runs at the input size, padded to or slid over by it.
    divisor = contract.size_divisor if (mode, input_size) == (contract.mode, contract.input_size) else None
    return dataclasses.replace(contract, mode=mode, input_size=input_size, size_divisor=divisor,
                               overlap=contract.overlap if overlap is None else float(overlap))


# --------------------------------------------------------------------------- TensorFlow


def rescaled_size(height, width, contract: InferenceContract, ratio: float = 1.0):
    """int32 [2]: the size the whole image is rescaled to, before windows; `ratio` multiplies the scale."""
    if contract.resize == "keep_ratio":
        return keep_ratio_size(height, width, contract.scale, ratio)
    if contract.resize == "fit":
        return fit_size(height, width, contract.scale, ratio)
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


def fit_size(height, width, box, ratio=1.0):
    """int32 [2]: (height, width) scaled, aspect kept, to fit inside the box (H, W) x ratio: its
    height at most H x ratio and its width at most W x ratio (--resize-mode fit's rule, for
    training's `keras_seg.data.fit_example` and for inference alike)."""
    size = tf.cast(tf.stack([height, width]), tf.float32)
    box = tf.constant([float(box[0]) * ratio, float(box[1]) * ratio], tf.float32)
    factor = tf.reduce_min(box / size)
    return tf.maximum(tf.cast(tf.minimum(tf.round(size * factor), tf.round(box)), tf.int32), 1)


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


def window_probabilities(images, model_fn: Callable, input_size, overlap: float, num_classes: int,
                         centre: bool = False):
    """Softmax [N, H, W, C] of uint8 images [N, H, W, 3] from windows of `input_size`.

    Images smaller than a window are padded with black at the bottom / right (`centre`: on both
    sides, half each, as training's letterbox); the padding's probabilities are dropped.
    Overlapping windows' probabilities are averaged.
    """
    tile_h, tile_w = (int(v) for v in input_size)
    stride_h, stride_w = (max(1, int(round(t * (1.0 - overlap)))) for t in (tile_h, tile_w))
    shape = tf.shape(images)
    height, width = shape[1], shape[2]
    padded_h, padded_w = tf.maximum(height, tile_h), tf.maximum(width, tile_w)
    top, left = ((padded_h - height) // 2, (padded_w - width) // 2) if centre else (0, 0)
    images = tf.pad(images, [[0, 0], [top, padded_h - height - top], [left, padded_w - width - left], [0, 0]])
    rows = window_offsets(padded_h, tile_h, stride_h)
    cols = window_offsets(padded_w, tile_w, stride_w)
    count_x = tf.size(cols)
    # Pixel positions of one window, shifted to each window's place: each window's softmax is added
    # into its own slice of the canvas, not padded to the canvas first (GBs at full resolution).
    grid = tf.stack(tf.meshgrid(tf.range(tile_h), tf.range(tile_w), indexing="ij"), axis=-1)

    def add_window(k, total, hits):
        y, x = rows[k // count_x], cols[k % count_x]
        window = tf.ensure_shape(images[:, y:y + tile_h, x:x + tile_w], [None, tile_h, tile_w, 3])
        probabilities = tf.cast(model_fn(tf.cast(window, tf.float32) / 255.0), tf.float32)
        where = grid + tf.stack([y, x])
        probabilities = tf.concat([probabilities, tf.zeros([1, tile_h, tile_w, num_classes])], axis=0)
        total = tf.tensor_scatter_nd_add(total, where, tf.transpose(probabilities, [1, 2, 0, 3]))
        hits = tf.tensor_scatter_nd_add(hits, where, tf.ones([tile_h, tile_w, 1]))
        return k + 1, total, hits

    # Pixel-major, windows are slices of it; one image more than the batch, always zero, because a
    # scatter into an empty tensor fails even when it adds nothing (a replica's empty last batch).
    total = tf.zeros([padded_h, padded_w, shape[0] + 1, num_classes])
    hits = tf.zeros([padded_h, padded_w, 1])
    _, total, hits = tf.while_loop(lambda k, *_: k < tf.size(rows) * count_x, add_window,
                                   (tf.constant(0), total, hits))
    averaged = (total[:, :, :-1] / hits[..., None])[top:top + height, left:left + width]
    return tf.transpose(averaged, [2, 0, 1, 3])


def canvas_probabilities(images, model_fn: Callable, canvas, size_divisor: int, centre: bool = False):
    """Softmax [N, H, W, C] of uint8 images [N, H, W, 3] in one model call on a canvas of at least
    `canvas` (int32 [2]) rounded up to multiples of `size_divisor`, the images padded with black at
    the bottom / right (`centre`: on both sides, half each); the padding's probabilities are dropped."""
    shape = tf.shape(images)
    height, width = shape[1], shape[2]
    canvas = tf.maximum(tf.cast(canvas, tf.int32), tf.stack([height, width]))
    canvas = (canvas + size_divisor - 1) // size_divisor * size_divisor
    top, left = ((canvas[0] - height) // 2, (canvas[1] - width) // 2) if centre else (0, 0)
    padded = tf.pad(images, [[0, 0], [top, canvas[0] - height - top], [left, canvas[1] - width - left], [0, 0]])
    probabilities = tf.cast(model_fn(tf.cast(padded, tf.float32) / 255.0), tf.float32)
    return probabilities[:, top:top + height, left:left + width]


def contract_probabilities(images, model_fn: Callable, contract: InferenceContract, num_classes: int,
                           flip: bool = False, scales=(1.0,)):
    """float32 softmax [N, H, W, C] of uint8 images [N, H, W, 3] (one size), at the images' own size.

    For each ratio in `scales`: the image rescaled by the contract (scale x ratio), with its mirror
    image too when `flip`, inferred by windows of the model's input size (a "whole" contract with a
    `size_divisor`: in one call at its own size, padded to that multiple; "fit": its box); the
    mirror's probabilities are flipped back; everything is resized to the image's size and averaged.

    Args:
        model_fn: float32 images [n, h, w, 3] in [0, 1] at `contract.input_size` (with a
            `size_divisor`: at any multiple of it) -> softmax [n, h, w, C].
    """
    images = tf.convert_to_tensor(images, tf.uint8)
    shape = tf.shape(images)
    count, height, width = shape[0], shape[1], shape[2]
    centre = contract.resize == "fit"  # where training's letterbox pads
    summed = None
    for ratio in scales:
        rescaled = resize_uint8(images, rescaled_size(height, width, contract, ratio))
        batch = tf.concat([rescaled, tf.reverse(rescaled, axis=[2])], axis=0) if flip else rescaled
        if contract.size_divisor:
            canvas = (tf.cast(tf.round(tf.constant(contract.scale, tf.float32) * ratio), tf.int32) if centre
                      else tf.shape(batch)[1:3])
            probabilities = canvas_probabilities(batch, model_fn, canvas, contract.size_divisor, centre)
        else:
            probabilities = window_probabilities(batch, model_fn, contract.input_size, contract.overlap,
                                                 num_classes, centre)
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
