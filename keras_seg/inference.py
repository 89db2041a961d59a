"""Inference shared by training's validation, evaluate, predict and export.

A `Segmenter` (defined in `keras_seg.segmenter`) is a model ready for inference, loaded by
`load_segmenter` from a deployment artifact (`keras_seg.runtimes`) or from either source:

* a training run directory (`config.json`, `dataset_info.json`, `best.keras`): the model is
  rebuilt from the config under the float32 policy, at the input size its inference contract
  names, and given the checkpoint's weights, so it computes in float32 whatever precision it was
  trained in;
* a SavedModel written by `keras_seg.export` (a version directory, or the model directory above
  the versions, where the highest version is taken, as TF Serving does).

Both follow the run's inference contract (`keras_seg.contract`): `Segmenter.probabilities(images)`
maps uint8 images [N, H, W, 3] of one size to float32 softmax [N, H, W, C] at that size. The graph
that does it, `SegmentationModule`, is the very one `keras_seg.export` saves, and the trainer's
validation runs the same `contract_probabilities`, so a run, its evaluation and its export infer
alike. Flip and multi-scale averaging (`evaluate --tta`) run the same function around the bare
model.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import tensorflow as tf

from keras_seg import contract as contracts
from keras_seg.labels import IGNORE_INDEX

# Defined in keras_seg.segmenter, which keras_seg.runtimes shares without importing this module;
# kept importable from here.
from keras_seg.segmenter import (  # noqa: F401
    EXPORT_FORMAT,
    EXPORT_FORMAT_VERSION,
    LABELS_NAME,
    InferenceError,
    Prediction,
    Segmenter,
    class_ids_and_confidence,
    exported_contracts,
    narrow,
)

SERVING_SIGNATURE = "serving_default"  # encoded JPEG / PNG bytes -> class_ids, confidence
UINT8_SIGNATURE = "segment_uint8"  # uint8 pixels -> class_ids, confidence
PROBABILITIES_SIGNATURE = "probabilities"  # uint8 pixels -> softmax at the images' size, by the contract
MODEL_SIGNATURE = "model_probabilities"  # float32 [0, 1] at the model's input size -> softmax (the bare model)
SIGNATURES = (SERVING_SIGNATURE, UINT8_SIGNATURE, PROBABILITIES_SIGNATURE, MODEL_SIGNATURE)


# --------------------------------------------------------------------------- the graph


def decode_image(encoded):
    """JPEG or PNG bytes -> uint8 [H, W, 3] (grey expanded, alpha dropped; EXIF orientation not applied).

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


class SegmentationModule(tf.Module):
    """A Keras model and the TensorFlow functions around it that `keras_seg.export` saves.

    Args:
        model: a Keras model mapping float32 images [N, h, w, 3] in [0, 1] to logits
            [N, h, w, C] at the contract's input size; build it under the float32 policy for a
            float32 graph.
        contract: the `keras_seg.contract.InferenceContract` the signatures follow.
        num_classes: C.
        labels_path: optional path of the `labels.json` to save as the SavedModel's asset.
    """

    def __init__(self, model, contract, num_classes, labels_path=None):
        super().__init__(name="keras_seg")
        self.model = model
        self.contract = contract
        self.num_classes = int(num_classes)
        if labels_path is not None:
            self.labels = tf.saved_model.Asset(labels_path)
        # A "whole" contract with a size divisor runs the model at the image's own (padded) size.
        size = (None, None) if contract.size_divisor else contract.input_size
        # One traced model call that every signature shares: the model is traced once.
        self.model_probabilities = tf.function(
            lambda images: {"probabilities": contracts.keras_model_fn(model)(images)},
            input_signature=[tf.TensorSpec([None, *size, 3], tf.float32, name="images")])

    def _bare(self, x):
        return self.model_probabilities(x)["probabilities"]

    def _probabilities(self, images):
        return contracts.contract_probabilities(images, self._bare, self.contract, self.num_classes)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def probabilities(self, images):
        """uint8 [N, H, W, 3] -> {"probabilities": float32 softmax [N, H, W, C]}, by the contract."""
        return {"probabilities": self._probabilities(images)}

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def segment_uint8(self, images):
        """uint8 [N, H, W, 3] -> {"class_ids": int32 [N, H, W], "confidence": float32 [N, H, W]}."""
        class_ids, confidence = class_ids_and_confidence(self._probabilities(images))
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
            MODEL_SIGNATURE: self.model_probabilities,
        }


# --------------------------------------------------------------------------- loading


def run_contract(config: dict) -> contracts.InferenceContract:
    """A run's contract from its config.json; runs recorded before contracts existed get the one
    their resize mode implies (stretching runs keep stretching)."""
    if config.get("inference"):
        contract = contracts.InferenceContract.from_dict(config["inference"], "config.json: inference")
        if config.get("resize_mode") == "fit" and contract.resize == "keep_ratio":
            # Recorded before "fit" had its own rule: keep_ratio ignored the box's orientation, so
            # portrait images were inferred at up to 2x the scale they were trained at.
            contract = replace(contract, resize="fit")
        return contract
    return contracts.for_training(config.get("resize_mode", "resize"), config["image_size"])


def model_info(config: dict, dataset_info: dict, contract=None) -> dict:
    """The labels and settings of a run's model: the content of an export's `assets/labels.json`."""
    contract = contract or run_contract(config)
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "preset": config.get("preset"),
        "architecture": config["model"].get("architecture"),
        "input_size": list(contract.input_size),
        "training_input_size": [int(v) for v in config["image_size"]],
        "inference": contract.to_dict(),
        "num_classes": int(dataset_info["num_classes"]),
        "class_names": list(dataset_info["class_names"]),
        "colors": [list(c) for c in dataset_info["class_colors"]],
        "ignore_index": int(dataset_info.get("ignore_index", IGNORE_INDEX)),
        "label_space": dataset_info.get("label_space"),
        "source": dataset_info.get("source"),
        "trained_precision": config.get("resolved", {}).get("precision"),
        "input": "RGB, uint8, any size: " + contract.describe(),
    }


def _read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise InferenceError(f"{path}: unreadable {what} ({err})") from err


def load_run_model(run_dir, checkpoint=None, mode=None, tile=None, overlap=None):
    """A run's model rebuilt under the float32 policy, at its contract's input size, with the checkpoint's weights.

    Args:
        run_dir: a directory written by `keras_seg.train`.
        checkpoint: the `.keras` file to take the weights from; default `RUN/best.keras`.
        mode, tile, overlap: changes to the run's inference contract (`keras_seg.contract.override`).

    Returns:
        (keras.Model computing in float32, model info dict as `model_info` gives it).

    Raises:
        InferenceError: not a run directory, no checkpoint, or weights that do not fit the config.
    """
    import keras

    from keras_seg.models.presets import build_model, recorded_model_config

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
    try:
        contract = contracts.override(run_contract(config), mode, tile, overlap)
    except contracts.ContractError as err:
        raise InferenceError(f"{config_path}: {err}") from err
    info = model_info(config, dataset_info, contract)

    # A mixed-precision checkpoint holds float32 variables: rebuilding under float32 and copying
    # them gives a float32 graph (a float16 one would be ~5x slower on a CPU server). The model is
    # fully convolutional: the same weights serve any input size the contract asks for.
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy("float32")
    try:
        size = (None, None) if contract.size_divisor else tuple(contract.input_size)  # see SegmentationModule
        entry = {"model": recorded_model_config(config["model"]), "input_size": size}
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
    if info.get("format_version") != EXPORT_FORMAT_VERSION:
        raise InferenceError(f"{path}: exported by an earlier keras-seg (format {info.get('format_version')}, this "
                             f"one reads {EXPORT_FORMAT_VERSION}): export the run again with keras_seg.export")
    try:
        loaded = tf.saved_model.load(path)
    except Exception as err:  # TF raises several types for a broken SavedModel
        raise InferenceError(f"{path}: unreadable SavedModel ({_first_line(err)})") from err
    missing = [name for name in SIGNATURES if name not in loaded.signatures]
    if missing:
        raise InferenceError(f"{path}: a SavedModel without the signatures {missing}: not exported by keras_seg.export")
    return loaded, info


def load_segmenter(path, mode=None, tile=None, overlap=None) -> Segmenter:
    """A `Segmenter` from a run directory, a `.keras` file in one, a `keras_seg.export` SavedModel, or
    an exported `.tflite` / `.onnx` / OpenVINO `.xml` (`keras_seg.runtimes`).

    Args:
        path: the model.
        mode, tile, overlap: changes to its inference contract (`keras_seg.contract.override`); an
            export's model has one input size, so a change of window is refused there.

    Raises:
        InferenceError: the path does not exist or is none of these, or the changes cannot apply.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InferenceError(f"{path}: no such file or directory")
    from keras_seg import runtimes  # .tflite / .onnx / OpenVINO .xml: windows run through their own runtime

    if runtimes.artifact_kind(path) and os.path.isfile(path):
        return runtimes.artifact_segmenter(path, mode, tile, overlap)
    if path.endswith(".keras") and os.path.isfile(path):
        model, info = load_run_model(os.path.dirname(os.path.abspath(path)), path, mode, tile, overlap)
        return segmenter_from_model(model, info, source=path)
    if os.path.isfile(os.path.join(path, "config.json")):
        model, info = load_run_model(path, None, mode, tile, overlap)
        return segmenter_from_model(model, info, source=path)
    version_dir = saved_model_version_dir(path)
    if version_dir is not None:
        loaded, info = load_saved_model(version_dir)
        recorded, wanted = exported_contracts(info, version_dir, mode, tile, overlap)
        bare = loaded.signatures[MODEL_SIGNATURE]
        contract_function = None  # a changed contract: the Segmenter runs it around the bare model
        if wanted == recorded:
            full = loaded.signatures[PROBABILITIES_SIGNATURE]
            contract_function = lambda images: full(images=images)["probabilities"]  # noqa: E731
        else:
            info = dict(info, inference=wanted.to_dict())
        return Segmenter(info, version_dir, "saved_model", contract_function,
                         lambda images: bare(images=images)["probabilities"], owner=loaded)
    raise InferenceError(f"{path}: neither a run directory (config.json, best.keras) nor a SavedModel "
                         "(saved_model.pb, or numbered version folders holding one)")


def segmenter_from_model(model, info, source="<model>") -> Segmenter:
    """A `Segmenter` around a Keras model (float32 images in [0, 1] -> logits) and its model info."""
    contract = contracts.InferenceContract.from_dict(info["inference"])
    module = SegmentationModule(model, contract, info["num_classes"])
    return Segmenter(info, source, "run", lambda images: module.probabilities(images)["probabilities"],
                     lambda images: module.model_probabilities(images)["probabilities"], owner=module)


def _first_line(err) -> str:
    text = getattr(err, "message", None) or str(err) or type(err).__name__
    return text.strip().splitlines()[0]
