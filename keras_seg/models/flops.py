"""Floating-point operations of a model's forward pass, counted by TensorFlow's profiler.

The profiler counts each multiply and each add: a convolution's multiply-accumulate is 2 FLOPs.
Papers and torchvision's model tables ("GFLOPs" 36.3 for DDRNet-23-slim at 1024x2048, 2.086 for
LR-ASPP MobileNetV3-Large at 520x520) count multiply-accumulates, half of this figure:
`multiply_accumulates` is what compares with them.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2


def forward_flops(model, input_size) -> int:
    """FLOPs of one image of `input_size` (H, W) through `model` in inference mode (batch 1)."""
    height, width = (int(v) for v in input_size)
    channels = int(model.input_shape[-1])
    function = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec((1, height, width, channels), tf.float32))
    graph = convert_variables_to_constants_v2(function).graph  # weights as constants: shapes fully known
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return int(tf.compat.v1.profiler.profile(graph=graph, options=options).total_float_ops)


def multiply_accumulates(model, input_size) -> int:
    """Multiply-accumulates of one image: what papers and torchvision call "FLOPs"."""
    return forward_flops(model, input_size) // 2
