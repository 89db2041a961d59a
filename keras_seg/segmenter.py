"""What every loader of a model for inference gives (`Segmenter`) and the names the loaders share.

`keras_seg.inference` loads runs and SavedModels, `keras_seg.runtimes` the deployment artifacts;
both build the `Segmenter` defined here and raise its `InferenceError`, so neither imports the
other's module to share them (`inference` imports `runtimes`, never the reverse).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import tensorflow as tf

from keras_seg import contract as contracts
from keras_seg.labels import IGNORE_INDEX

LABELS_NAME = "labels.json"  # in the SavedModel's assets/
EXPORT_FORMAT = "keras_seg.export"
EXPORT_FORMAT_VERSION = 2  # 2: the inference contract; signatures at the images' own size


class InferenceError(ValueError):
    """A model or an input that cannot be used, said in one line."""


def class_ids_and_confidence(probabilities):
    """Softmax maps [N, H, W, C] -> (int32 arg-max class [N, H, W], float32 top probability [N, H, W])."""
    return tf.argmax(probabilities, axis=-1, output_type=tf.int32), tf.reduce_max(probabilities, axis=-1)


@dataclass
class Segmenter:
    """A model ready for inference: `keras_seg.inference.load_segmenter` makes one from a run, a SavedModel
    or a deployment artifact (`keras_seg.runtimes.artifact_segmenter`). `probabilities(images)` maps uint8
    images [N, H, W, 3] of one size to float32 softmax [N, H, W, C] at that size, by the contract.

    Attributes:
        info: the model's labels and settings, as `assets/labels.json` of an export holds them:
            `class_names`, `colors`, `ignore_index`, `label_space`, `num_classes`, `inference`
            (the contract), `input_size` (the model's), `preset`, ...
        source: where it was loaded from.
        kind: "run", "saved_model", or an artifact's runtime ("litert", "onnx", "openvino").
        contract_function: uint8 [N, H, W, 3] -> float32 softmax [N, H, W, C], by the contract;
            None: built from `model_function` and the contract in `info`.
        model_function: float32 [n, h, w, 3] in [0, 1] at the input size -> softmax (the bare model).
        owner: the `SegmentationModule` or loaded SavedModel the functions belong to (kept alive).
    """

    info: dict
    source: str
    kind: str
    contract_function: Callable | None
    model_function: Callable
    owner: object = None
    _averaged: dict = field(default_factory=dict, repr=False)

    @property
    def contract(self) -> contracts.InferenceContract:
        return contracts.InferenceContract.from_dict(self.info["inference"], f"{self.source}: inference")

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

    def probabilities(self, images, flip=False, scales=(1.0,)):
        """uint8 images [N, H, W, 3] (one size) -> float32 softmax tensor [N, H, W, C] at their size,
        averaged with the mirror images (`flip`) and over the scale ratios `scales` on request."""
        images = tf.convert_to_tensor(images, tf.uint8)
        scales = tuple(float(s) for s in scales)
        if not flip and scales == (1.0,) and self.contract_function is not None:
            return self.contract_function(images)
        key = (bool(flip), scales)
        if key not in self._averaged:
            contract, num_classes, bare = self.contract, self.num_classes, self.model_function
            self._averaged[key] = tf.function(
                lambda x: contracts.contract_probabilities(x, bare, contract, num_classes, flip, scales),
                input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
        return self._averaged[key](images)

    def predict(self, image, flip=False, scales=(1.0,)) -> Prediction:
        """Class ids and confidence of one uint8 image [H, W, 3] at its own size."""
        image = np.asarray(image, np.uint8)
        if image.ndim != 3 or image.shape[2] != 3:
            raise InferenceError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
        class_ids, confidence = class_ids_and_confidence(self.probabilities(image[None], flip, scales))
        return Prediction(narrow(class_ids.numpy()[0]), confidence.numpy()[0])


@dataclass
class Prediction:
    """One image's prediction at the image's size."""

    class_ids: np.ndarray  # uint8 [H, W]; int32 when an id reaches 255 (models of over 255 classes)
    confidence: np.ndarray  # float32 [H, W], the top softmax probability


def narrow(class_ids):
    return class_ids.astype(np.uint8) if class_ids.size == 0 or class_ids.max() < 255 else class_ids


def exported_contracts(info: dict, source, mode=None, tile=None, overlap=None):
    """An export's recorded contract and the one asked for (`contracts.override`), as (recorded, wanted).

    An export runs at its recorded input size only: a wanted contract with other windows is refused.
    """
    recorded = contracts.InferenceContract.from_dict(info["inference"], f"{source}: inference")
    try:
        wanted = contracts.override(recorded, mode, tile, overlap)
    except contracts.ContractError as err:
        raise InferenceError(f"{source}: {err}") from err
    if wanted.input_size != recorded.input_size:
        raise InferenceError(f"{source}: the exported model takes {recorded.input_size[0]}x"
                             f"{recorded.input_size[1]} inputs only; use the run directory for other windows")
    return recorded, wanted
