"""Layers the builders share that Keras lacks for inputs of unknown size."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def bilinear_taps(factor: int) -> tuple[int, np.ndarray]:
    """How a half-pixel bilinear up-sampling by `factor` spreads one output back over its input.

    With the input padded by one edge-replicated pixel on each side (which is how `tf.image.resize`
    clamps), output m takes padded pixel j with weight `taps[m - factor * j - first]`: returns
    (first, taps), the offset of the first non-zero weight and the weights, in float64.
    """
    offsets = np.arange(-2 * factor, factor + 1)
    # Output m's centre lies at (m + 0.5) / factor - 0.5 input pixels, +1 in the padded input.
    weights = np.maximum(0.0, 1.0 - np.abs((offsets + 0.5) / factor + 0.5))
    nonzero = np.flatnonzero(weights > 1e-12)
    return int(offsets[nonzero[0]]), weights[nonzero[0]:nonzero[-1] + 1]


def bilinear_up_gradient(upstream, factor: int):
    """The gradient of `tf.image.resize(x, factor * x's size, "bilinear")` with respect to x, given the
    float32 gradient of its output: one depthwise convolution of stride `factor` (multi-threaded on CPU,
    where TensorFlow's ResizeBilinearGrad is a single-threaded loop), then the edge pixels folded back."""
    first, taps = bilinear_taps(factor)
    kernel = tf.constant(np.outer(taps, taps)[:, :, None, None], tf.float32)
    kernel = tf.tile(kernel, [1, 1, tf.shape(upstream)[-1], 1])
    pad = [-first, factor + first + len(taps)]
    # The gradient of the input padded by one pixel each side, (height + 2, width + 2) ...
    padded_gradient = tf.raw_ops.DepthwiseConv2dNative(input=upstream, filter=kernel, strides=[1, factor, factor, 1],
                                                       padding="EXPLICIT", explicit_paddings=[0, 0, *pad, *pad, 0, 0])
    # ... whose outer rows and columns (the replicated edges) add onto the edges.
    return tf.raw_ops.MirrorPadGrad(input=padded_gradient, paddings=[[0, 0], [1, 1], [1, 1], [0, 0]],
                                    mode="SYMMETRIC")


@keras.saving.register_keras_serializable(package="keras_seg")
class UpSample2D(keras.layers.Layer):
    """Up-sampling by an integer factor, as `keras.layers.UpSampling2D` ("bilinear": `tf.image.resize`
    without antialiasing, half-pixel centres; "nearest"), also on inputs whose height and width are
    unknown until run time.

    Keras 3.15's UpSampling2D computes the new size from the static shape and fails inside a
    `tf.function` on a (None, None)-input model (OperatorNotAllowedInGraphError); whole-image
    inference at each image's own size (`keras_seg.contract`, size_divisor) needs such a model.
    It has no weights: a model saved with UpSampling2D loads its weights into one built with this.

    "bilinear" runs `tf.image.resize` forward (the op every export maps to its own resize) and
    `bilinear_up_gradient` backward (one factor for rows and columns): TensorFlow's own gradient op
    is a single-threaded loop on CPU.
    `use_resize_gradient = True` on a layer takes TensorFlow's gradient (tools/bench_upsample.py).
    """

    use_resize_gradient = False

    def __init__(self, size=2, interpolation: str = "bilinear", **kwargs):
        super().__init__(**kwargs)
        if interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"UpSample2D: interpolation must be bilinear or nearest, got {interpolation!r}")
        # (rows, columns), as UpSampling2D's `size`; an int for both.
        self.size = tuple(int(v) for v in size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        self.interpolation = interpolation

    def call(self, inputs):
        shape = tf.shape(inputs)
        new_size = [shape[1] * self.size[0], shape[2] * self.size[1]]
        # TensorFlow's depthwise convolution takes one stride for rows and columns.
        if self.interpolation == "nearest" or self.use_resize_gradient or self.size[0] != self.size[1]:
            resized = tf.image.resize(inputs, new_size, method=self.interpolation)
        else:
            resized = self._bilinear(inputs, new_size)
        return tf.cast(resized, inputs.dtype)

    def _bilinear(self, inputs, new_size):
        @tf.custom_gradient
        def resize(images):
            def gradient(upstream):
                return tf.cast(bilinear_up_gradient(upstream, self.size[0]), images.dtype)
            # float32 whatever the input dtype, as tf.image.resize interpolates: call() rounds once.
            return tf.image.resize(images, new_size, method="bilinear"), gradient

        return resize(inputs)

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        scaled = [None if side is None else side * factor for side, factor in zip((height, width), self.size)]
        return (batch, *scaled, channels)

    def get_config(self):
        return {**super().get_config(), "size": list(self.size), "interpolation": self.interpolation}
