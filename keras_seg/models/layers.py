"""Layers the builders share: where Keras' own fail on inputs of unknown size or miss TensorFlow's fused kernels."""

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


@keras.saving.register_keras_serializable(package="keras_seg")
class BatchNormalization(keras.layers.BatchNormalization):
    """Keras' BatchNormalization whose training call runs TensorFlow's fused kernel.

    On the TensorFlow backend Keras 3 computes the batch moments and the normalisation with a dozen
    separate elementwise ops and their gradients; `FusedBatchNormV3` (which oneDNN implements) does
    the forward pass and the backward pass in one kernel each. unet_small's whole training step took
    0.86x the wall time (0.89x the CPU time) in float32 and 0.85x in mixed_bfloat16: medians of the
    per-round ratios, shared 2-core Xeon, oneDNN on (tools/bench_batch_norm.py).

    The computation is Keras' own: batch mean and biased variance, moving statistics
    `moving * momentum + batch * (1 - momentum)`, statistics and normalisation in float32 (a bfloat16
    input is read and written as bfloat16 by the kernel, which computes in float32 inside, as Keras'
    casts do), the same variables in the same order, so weights and .keras files move between the two
    classes either way.

    The fused kernel runs only on a training call of a trainable layer over a 4-D channels-last
    input without a mask, and not with `synchronized` (statistics over every replica's batch) or
    `renorm`, which Keras' call handles. Inference is Keras' call, op for op, so exports are unchanged.
    """

    def _fused_applies(self, inputs, training, mask) -> bool:
        return bool(training and self.trainable and mask is None and not self.synchronized and not self.renorm
                    and len(inputs.shape) == 4 and self.axis in (-1, 3)
                    and inputs.dtype in (tf.float32, tf.float16, tf.bfloat16))

    def call(self, inputs, training=None, mask=None):
        if not self._fused_applies(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        # Keras casts the input to float32 and back. The kernel computes in float32 inside whatever
        # its input dtype, and oneDNN's bfloat16 kernel saves the two casts (measured on the step).
        native = inputs.dtype == tf.bfloat16 and self.compute_dtype == "bfloat16"
        x = inputs if native else tf.cast(inputs, tf.float32)
        channels = self.moving_mean.shape[0]
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels], tf.float32)
        beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels], tf.float32)
        no_statistics = tf.constant([], tf.float32)  # training with exponential_avg_factor 1 reads none
        outputs, mean, corrected_variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=gamma, offset=beta, mean=no_statistics, variance=no_statistics, epsilon=self.epsilon,
            exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
        # The kernel returns the variance with Bessel's correction, n / max(n - 1, 1) over the n values
        # of a channel; Keras keeps the biased variance.
        shape = tf.shape(x, out_type=tf.int64)
        count = shape[0] * shape[1] * shape[2]
        variance = corrected_variance * (tf.cast(tf.maximum(count - 1, 1), tf.float32) / tf.cast(count, tf.float32))
        moving_mean = tf.cast(self.moving_mean, tf.float32)
        moving_variance = tf.cast(self.moving_variance, tf.float32)
        self.moving_mean.assign(moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return tf.cast(outputs, self.compute_dtype)
