"""Layers the builders share that Keras lacks for inputs of unknown size."""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="keras_seg")
class UpSample2D(keras.layers.Layer):
    """Up-sampling by an integer factor, as `keras.layers.UpSampling2D` ("bilinear": `tf.image.resize`
    without antialiasing, half-pixel centres; "nearest"), also on inputs whose height and width are
    unknown until run time.

    Keras 3.15's UpSampling2D computes the new size from the static shape and fails inside a
    `tf.function` on a (None, None)-input model (OperatorNotAllowedInGraphError); whole-image
    inference at each image's own size (`keras_seg.contract`, size_divisor) needs such a model.
    It has no weights: a model saved with UpSampling2D loads its weights into one built with this.
    """

    def __init__(self, size=2, interpolation: str = "bilinear", **kwargs):
        super().__init__(**kwargs)
        if interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"UpSample2D: interpolation must be bilinear or nearest, got {interpolation!r}")
        # (rows, columns), as UpSampling2D's `size`; an int for both.
        self.size = tuple(int(v) for v in size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        self.interpolation = interpolation

    def call(self, inputs):
        shape = tf.shape(inputs)
        resized = tf.image.resize(inputs, [shape[1] * self.size[0], shape[2] * self.size[1]], method=self.interpolation)
        return tf.cast(resized, inputs.dtype)

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        scaled = [None if side is None else side * factor for side, factor in zip((height, width), self.size)]
        return (batch, *scaled, channels)

    def get_config(self):
        return {**super().get_config(), "size": list(self.size), "interpolation": self.interpolation}
