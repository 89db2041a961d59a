"""Inference shared by evaluate, predict and export: loading a model, resize mode, sliding windows, flips.

A `Segmenter` is a model ready for inference, loaded by `load_segmenter` from either source:

* a training run directory (`config.json`, `dataset_info.json`, `best.keras`): the model is
  rebuilt from the config under the float32 policy and given the checkpoint's weights, so it
  computes in float32 whatever precision it was trained in;
* a SavedModel written by `keras_seg.export` (a version directory, or the model directory above
  the versions, where the highest version is taken, as TF Serving does).

Both give `probabilities(images)`: uint8 images [N, H, W, 3] of any one size -> float32 softmax
[N, h, w, C] at the model's input size (h, w). The graph that does it, `SegmentationModule`, is
the very one `keras_seg.export` saves, so a run and its export preprocess alike: resize to the
input size as the training pipeline does (`keras_seg.data.resize_example`: bilinear,
antialiased, rounded to uint8), divide by 255, predict, softmax.

On top of it, for whole images of any size:

* resize mode (`predict_image(..., mode="resize")`): probabilities at the input size, resized
  back (bilinear) to the image's size;
* sliding window (`mode="slide"`): tiles (default: the input size) with overlap; the softmax
  probabilities of overlapping tiles are averaged, so the image is seen at its own resolution;
* flip averaging (`flip=True`): the probabilities of the image and of its mirror image, averaged.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import tensorflow as tf

from keras_seg.labels import IGNORE_INDEX

LABELS_NAME = "labels.json"  # in the SavedModel's assets/
EXPORT_FORMAT = "keras_seg.export"
EXPORT_FORMAT_VERSION = 1

SERVING_SIGNATURE = "serving_default"  # encoded JPEG / PNG bytes -> class_ids, confidence
UINT8_SIGNATURE = "segment_uint8"  # uint8 pixels -> class_ids, confidence
PROBABILITIES_SIGNATURE = "probabilities"  # uint8 pixels -> softmax at the model's input size

MODES = ("resize", "slide")
DEFAULT_OVERLAP = 1 / 3  # MMSegmentation's slide inference: stride = 2/3 of the tile


class InferenceError(ValueError):
    """A model or an input that cannot be used, said in one line."""


# --------------------------------------------------------------------------- the graph


def decode_image(encoded):
    """JPEG or PNG bytes -> uint8 [H, W, 3] (grey expanded, alpha dropped).

    JPEG with the accurate integer DCT, as `keras_seg.data.decode_record`: the pixels that PIL and
    OpenCV give, i.e. what the model saw in training.
    """
    image = tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_png(encoded, channels=3, dtype=tf.uint8),
    )
    return tf.ensure_shape(image, [None, None, 3])


def encoded_image_size(encoded):
    """(height, width) int32 of JPEG or PNG bytes from the header alone (PNG: IHDR); (-1, -1) for others."""
    def png_or_unknown():
        is_png = tf.equal(tf.strings.substr(encoded, 0, 8), b"\x89PNG\r\n\x1a\n")
        return tf.cond(
            tf.logical_and(is_png, tf.strings.length(encoded) >= 24),
            lambda: tf.reverse(tf.io.decode_raw(tf.strings.substr(encoded, 16, 8), tf.int32, little_endian=False), [0]),
            lambda: tf.constant([-1, -1], tf.int32),
        )

    return tf.cond(tf.io.is_jpeg(encoded), lambda: tf.io.extract_jpeg_shape(encoded)[:2], png_or_unknown)


def decode_images(encoded):
    """A batch of encoded images [N] (one size) -> uint8 [N, H, W, 3]."""
    first_size = encoded_image_size(encoded[0])

    def decode_same_size(one):
        image = decode_image(one)
        # Said plainly, rather than as TensorArray's "incompatible shapes during merge".
        same = tf.logical_or(first_size[0] < 0, tf.reduce_all(tf.equal(tf.shape(image)[:2], first_size)))
        with tf.control_dependencies([tf.debugging.Assert(same, ["the images of one call must share one size"])]):
            return tf.identity(image)

    return tf.map_fn(decode_same_size, encoded, fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))


def to_model_input(images, input_size):
    """uint8 [N, H, W, 3] -> float32 [N, h, w, 3] in [0, 1] at `input_size`, as the training reader.

    Resized like `keras_seg.data.resize_example` (bilinear, antialiased, rounded back to uint8),
    and not at all when the images already have the input size.
    """
    shape = tf.shape(images)

    def resize():
        resized = tf.image.resize(images, input_size, method="bilinear", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)

    same = tf.logical_and(shape[1] == input_size[0], shape[2] == input_size[1])
    images = tf.cond(same, lambda: images, resize)
    images = tf.ensure_shape(images, [None, *input_size, 3])
    return tf.cast(images, tf.float32) / 255.0


def resize_probabilities(probabilities, size):
    """Softmax maps [N, h, w, C] -> [N, H, W, C], bilinear (each pixel stays a distribution)."""
    return tf.image.resize(probabilities, size, method="bilinear")


def class_ids_and_confidence(probabilities):
    """Softmax maps [N, H, W, C] -> (int32 arg-max class [N, H, W], float32 top probability [N, H, W])."""
    return tf.argmax(probabilities, axis=-1, output_type=tf.int32), tf.reduce_max(probabilities, axis=-1)


class SegmentationModule(tf.Module):
    """A Keras model and the TensorFlow functions around it that `keras_seg.export` saves.

    Args:
        model: a Keras model mapping float32 images [N, h, w, 3] in [0, 1] to logits
            [N, h, w, C]; build it under the float32 policy for a float32 graph.
        input_size: (h, w), the size the model takes.
        labels_path: optional path of the `labels.json` to save as the SavedModel's asset.
    """

    def __init__(self, model, input_size, labels_path=None):
        super().__init__(name="keras_seg")
        self.model = model
        self.input_size = tuple(int(v) for v in input_size)
        if labels_path is not None:
            self.labels = tf.saved_model.Asset(labels_path)
        # One traced model call that every signature shares: the model is traced once, not thrice.
        self.logits = tf.function(lambda x: model(x, training=False),
                                  input_signature=[tf.TensorSpec([None, *self.input_size, 3], tf.float32)])

    def _probabilities(self, images):
        logits = self.logits(to_model_input(images, self.input_size))
        return tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def probabilities(self, images):
        """uint8 [N, H, W, 3] -> {"probabilities": float32 softmax [N, h, w, C] at the model's input size}."""
        return {"probabilities": self._probabilities(images)}

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def segment_uint8(self, images):
        """uint8 [N, H, W, 3] -> {"class_ids": int32 [N, H, W], "confidence": float32 [N, H, W]}."""
        probabilities = resize_probabilities(self._probabilities(images), tf.shape(images)[1:3])
        class_ids, confidence = class_ids_and_confidence(probabilities)
        return {"class_ids": class_ids, "confidence": confidence}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def segment_encoded(self, images):
        """Encoded JPEG / PNG bytes [N] (one size) -> as `segment_uint8`."""
        return self.segment_uint8(decode_images(images))

    def signatures(self) -> dict:
        return {
            SERVING_SIGNATURE: self.segment_encoded,
            UINT8_SIGNATURE: self.segment_uint8,
            PROBABILITIES_SIGNATURE: self.probabilities,
        }


@tf.function(input_signature=[tf.TensorSpec([None, None, None, None], tf.float32),
                              tf.TensorSpec([2], tf.int32)])
def _finish(probabilities, size):
    return class_ids_and_confidence(resize_probabilities(probabilities, size))


# --------------------------------------------------------------------------- loading


@dataclass
class Segmenter:
    """A model ready for inference (see the module docstring); `load_segmenter` makes one.

    Attributes:
        info: the model's labels and settings, as `assets/labels.json` of an export holds them:
            `class_names`, `colors`, `ignore_index`, `label_space`, `num_classes`, `input_size`,
            `preset`, ...
        source: where it was loaded from.
        kind: "run" or "saved_model".
        function: uint8 tensor [N, H, W, 3] -> float32 softmax tensor [N, h, w, C].
        owner: the `SegmentationModule` or loaded SavedModel that `function` belongs to (kept
            alive with it).
    """

    info: dict
    source: str
    kind: str
    function: Callable
    owner: object = None

    @property
    def input_size(self) -> tuple:
        return tuple(self.info["input_size"])

    @property
    def num_classes(self) -> int:
        return int(self.info["num_classes"])

    @property
    def class_names(self) -> list:
        return list(self.info["class_names"])

    @property
    def colors(self) -> list:
        return [tuple(c) for c in self.info["colors"]]

    @property
    def ignore_index(self) -> int:
        return int(self.info.get("ignore_index", IGNORE_INDEX))

    @property
    def label_space(self):
        return self.info.get("label_space")

    def probabilities(self, images):
        """uint8 images [N, H, W, 3] (one size) -> float32 softmax tensor [N, h, w, C] at the input size."""
        return self.function(tf.convert_to_tensor(images, tf.uint8))


def model_info(config: dict, dataset_info: dict) -> dict:
    """The labels and settings of a run's model: the content of an export's `assets/labels.json`."""
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "preset": config.get("preset"),
        "architecture": config["model"].get("architecture"),
        "input_size": [int(v) for v in config["image_size"]],
        "num_classes": int(dataset_info["num_classes"]),
        "class_names": list(dataset_info["class_names"]),
        "colors": [list(c) for c in dataset_info["class_colors"]],
        "ignore_index": int(dataset_info.get("ignore_index", IGNORE_INDEX)),
        "label_space": dataset_info.get("label_space"),
        "source": dataset_info.get("source"),
        "trained_precision": config.get("resolved", {}).get("precision"),
        "input": "RGB, uint8, resized (bilinear, antialiased) to input_size and divided by 255",
    }


def _read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise InferenceError(f"{path}: unreadable {what} ({err})") from err


def load_run_model(run_dir, checkpoint=None):
    """A run's model rebuilt under the float32 policy with the checkpoint's weights.

    Args:
        run_dir: a directory written by `keras_seg.train`.
        checkpoint: the `.keras` file to take the weights from; default `RUN/best.keras`.

    Returns:
        (keras.Model computing in float32, model info dict as `model_info` gives it).

    Raises:
        InferenceError: not a run directory, no checkpoint, or weights that do not fit the config.
    """
    import keras

    from keras_seg.models.presets import build_model

    config_path = os.path.join(run_dir, "config.json")
    info_path = os.path.join(run_dir, "dataset_info.json")
    checkpoint = checkpoint or os.path.join(run_dir, "best.keras")
    if not os.path.isdir(run_dir):
        raise InferenceError(f"{run_dir}: no such directory")
    for path in (config_path, info_path):
        if not os.path.isfile(path):
            raise InferenceError(f"{run_dir}: no {os.path.basename(path)}: not a run directory of keras_seg.train")
    if not os.path.isfile(checkpoint):
        raise InferenceError(f"{run_dir}: no {os.path.basename(checkpoint)} (has the run finished an epoch?)")
    config = _read_json(config_path, "run config")
    dataset_info = _read_json(info_path, "dataset info")
    for key in ("model", "image_size"):
        if key not in config:
            raise InferenceError(f"{config_path}: lacks '{key}'")
    for key in ("num_classes", "class_names", "class_colors"):
        if key not in dataset_info:
            raise InferenceError(f"{info_path}: lacks '{key}'")
    info = model_info(config, dataset_info)

    # A mixed-precision checkpoint holds float32 variables: rebuilding under float32 and copying
    # them gives a float32 graph (a float16 one would be ~5x slower on a CPU server).
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy("float32")
    try:
        entry = {"model": config["model"], "input_size": tuple(info["input_size"])}
        model = build_model(entry, info["num_classes"])
        try:
            model.load_weights(checkpoint)
        except (ValueError, KeyError, OSError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InferenceError(f"{checkpoint}: weights do not fit the model of {config_path} ({first})") from err
    finally:
        keras.mixed_precision.set_dtype_policy(previous)
    return model, info


def saved_model_version_dir(path) -> str | None:
    """`path` if it holds a SavedModel; the highest numbered version below it if those do; else None."""
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    versions = [name for name in os.listdir(path) if name.isdigit()
                and os.path.isfile(os.path.join(path, name, "saved_model.pb"))] if os.path.isdir(path) else []
    return os.path.join(path, max(versions, key=int)) if versions else None


def load_saved_model(path):
    """An export of `keras_seg.export`: (loaded SavedModel, model info from `assets/labels.json`)."""
    labels = os.path.join(path, "assets", LABELS_NAME)
    if not os.path.isfile(labels):
        raise InferenceError(f"{path}: a SavedModel without assets/{LABELS_NAME}: not exported by keras_seg.export")
    info = _read_json(labels, "labels file")
    if info.get("format") != EXPORT_FORMAT:
        raise InferenceError(f"{labels}: not a keras_seg.export labels file")
    try:
        loaded = tf.saved_model.load(path)
    except Exception as err:  # TF raises several types for a broken SavedModel
        raise InferenceError(f"{path}: unreadable SavedModel ({_first_line(err)})") from err
    missing = [name for name in (SERVING_SIGNATURE, UINT8_SIGNATURE, PROBABILITIES_SIGNATURE)
               if name not in loaded.signatures]
    if missing:
        raise InferenceError(f"{path}: a SavedModel without the signatures {missing}: not exported by keras_seg.export")
    return loaded, info


def load_segmenter(path) -> Segmenter:
    """A `Segmenter` from a run directory, a `.keras` file in one, or a `keras_seg.export` SavedModel.

    Raises:
        InferenceError: the path does not exist or is none of these.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InferenceError(f"{path}: no such file or directory")
    if path.endswith(".keras") and os.path.isfile(path):
        model, info = load_run_model(os.path.dirname(os.path.abspath(path)), checkpoint=path)
        return segmenter_from_model(model, info, source=path)
    if os.path.isfile(os.path.join(path, "config.json")):
        model, info = load_run_model(path)
        return segmenter_from_model(model, info, source=path)
    version_dir = saved_model_version_dir(path)
    if version_dir is not None:
        loaded, info = load_saved_model(version_dir)
        function = loaded.signatures[PROBABILITIES_SIGNATURE]
        return Segmenter(info, version_dir, "saved_model", lambda images: function(images=images)["probabilities"],
                         owner=loaded)
    raise InferenceError(f"{path}: neither a run directory (config.json, best.keras) nor a SavedModel "
                         "(saved_model.pb, or numbered version folders holding one)")


def segmenter_from_model(model, info, source="<model>") -> Segmenter:
    """A `Segmenter` around a Keras model (float32 images in [0, 1] -> logits) and its model info."""
    module = SegmentationModule(model, info["input_size"])
    return Segmenter(info, source, "run", lambda images: module.probabilities(images)["probabilities"], owner=module)


def _first_line(err) -> str:
    text = getattr(err, "message", None) or str(err) or type(err).__name__
    return text.strip().splitlines()[0]


# --------------------------------------------------------------------------- whole images


def window_offsets(length: int, tile: int, stride: int) -> list:
    """Start offsets of tiles of `tile` pixels covering `length` with `stride`; the last one ends at the edge."""
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / stride) + 1
    return sorted({min(i * stride, length - tile) for i in range(count)})


def _with_flips(images, flip):
    return np.concatenate([images, images[:, :, ::-1]]) if flip else images


def _average_flips(probabilities, count, flip):
    """[count (+ count mirrored), h, w, C] -> [count, h, w, C], the mirrored ones flipped back."""
    if not flip:
        return probabilities
    return (probabilities[:count] + tf.reverse(probabilities[count:], axis=[2])) / 2.0


def predict_probabilities_resized(segmenter: Segmenter, images, flip=False):
    """Softmax at the model's input size of uint8 images [N, H, W, 3] (one size), flip-averaged on request."""
    images = np.asarray(images, np.uint8)
    return _average_flips(segmenter.probabilities(_with_flips(images, flip)), len(images), flip)


def sliding_window_probabilities(segmenter: Segmenter, image, tile=None, overlap=None, flip=False,
                                 batch_size=8) -> np.ndarray:
    """Softmax [H, W, C] of one image at its own resolution from overlapping tiles.

    Tiles of `tile` (h, w) pixels (default: the model's input size; other sizes are resized to it
    and back) step by `tile * (1 - overlap)`, the last row and column ending at the image's edge;
    an image smaller than a tile is padded with black at the bottom / right (the padding's
    probabilities are dropped). Where tiles overlap, their probabilities are averaged.

    Args:
        segmenter: the model.
        image: uint8 [H, W, 3].
        tile: (h, w) or None for the model's input size.
        overlap: share of a tile that its neighbour covers again, in [0, 1); None: `DEFAULT_OVERLAP`.
        flip: average each tile with its mirror image, too.
        batch_size: tiles per model call.
    """
    image = np.asarray(image, np.uint8)
    tile = tuple(int(v) for v in (tile or segmenter.input_size))
    overlap = DEFAULT_OVERLAP if overlap is None else float(overlap)
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    height, width = image.shape[:2]
    padded_h, padded_w = max(height, tile[0]), max(width, tile[1])
    if (padded_h, padded_w) != (height, width):
        image = np.pad(image, ((0, padded_h - height), (0, padded_w - width), (0, 0)))
    strides = [max(1, int(round(t * (1.0 - overlap)))) for t in tile]
    origins = [(y, x) for y in window_offsets(padded_h, tile[0], strides[0])
               for x in window_offsets(padded_w, tile[1], strides[1])]

    total = np.zeros((padded_h, padded_w, segmenter.num_classes), np.float32)
    counts = np.zeros((padded_h, padded_w, 1), np.float32)
    for start in range(0, len(origins), batch_size):
        batch = origins[start:start + batch_size]
        tiles = np.stack([image[y:y + tile[0], x:x + tile[1]] for y, x in batch])
        probabilities = predict_probabilities_resized(segmenter, tiles, flip)
        if tuple(probabilities.shape[1:3]) != tile:
            probabilities = resize_probabilities(probabilities, tile)
        probabilities = np.asarray(probabilities)
        for (y, x), tile_probabilities in zip(batch, probabilities):
            total[y:y + tile[0], x:x + tile[1]] += tile_probabilities
            counts[y:y + tile[0], x:x + tile[1]] += 1.0
    return (total / counts)[:height, :width]


@dataclass
class Prediction:
    """One image's prediction at the image's size."""

    class_ids: np.ndarray  # uint8 [H, W]; int32 when an id reaches 255 (models of over 255 classes)
    confidence: np.ndarray  # float32 [H, W], the top softmax probability


def predict_image(segmenter: Segmenter, image, mode="resize", flip=False, tile=None, overlap=None,
                  batch_size=8) -> Prediction:
    """Class ids and confidence of one uint8 image [H, W, 3] at its own size.

    Args:
        mode: "resize" (predict at the model's input size, probabilities resized back) or
            "slide" (`sliding_window_probabilities`).
        flip, tile, overlap, batch_size: see `sliding_window_probabilities` (`tile`, `overlap`,
            `batch_size` only apply to "slide").
    """
    image = np.asarray(image, np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise InferenceError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    if mode == "resize":
        probabilities = predict_probabilities_resized(segmenter, image[None], flip)
    elif mode == "slide":
        probabilities = sliding_window_probabilities(segmenter, image, tile, overlap, flip, batch_size)[None]
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    probabilities = tf.convert_to_tensor(probabilities, tf.float32)
    if tuple(probabilities.shape[1:3]) == image.shape[:2]:  # sliding windows: already at the image's size
        class_ids, confidence = class_ids_and_confidence(probabilities)
    else:
        class_ids, confidence = _finish(probabilities, tf.constant(image.shape[:2], tf.int32))
    return Prediction(_narrow(class_ids.numpy()[0]), confidence.numpy()[0])


def predict_batch_at_input_size(segmenter: Segmenter, images, flip=False) -> np.ndarray:
    """Class ids [N, h, w] of uint8 images already at the model's input size (evaluation's default mode)."""
    probabilities = predict_probabilities_resized(segmenter, images, flip)
    return _narrow(tf.argmax(probabilities, axis=-1, output_type=tf.int32).numpy())


def _narrow(class_ids):
    return class_ids.astype(np.uint8) if class_ids.size == 0 or class_ids.max() < 255 else class_ids
