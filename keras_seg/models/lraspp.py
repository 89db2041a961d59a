"""LR-ASPP (Lite Reduced ASPP) over MobileNetV3-Large or -Small.

Howard et al., "Searching for MobileNetV3", 2019, https://arxiv.org/abs/1905.02244, section 6.3,
with torchvision's `lraspp_mobilenet_v3_large` as the reference of the head's sizes. The encoder's
last stage is dilated (output stride 16, as the paper). The head: a 1x1 convolution (128) with batch
norm and ReLU on the stride-16 features, gated by a sigmoid of the same features' global average
(a 1x1 convolution, no bias), up-sampled to stride 8; class scores from it and from the stride-8
block output, summed; bilinear up-sampling to the input size. At 21 classes over the Large it has
torchvision's 3,221,538 trainable parameters (tests/test_realtime_models.py).
"""

from __future__ import annotations

import keras
from keras import layers

from keras_seg.models.deeplab import BroadcastLike
from keras_seg.models.encoders import build_encoder
from keras_seg.models.layers import UpSample2D
from keras_seg.models.unet import check_input_size

# The stride-8 block outputs LR-ASPP's low branch reads (40 channels on the Large, 24 on the Small):
# the blocks' outputs, not the expansions the encoder table taps.
LOW_LEVEL_LAYER = {"mobilenetv3large": "expanded_conv_5_add", "mobilenetv3small": "expanded_conv_2_add"}


def build_lraspp(
    num_classes: int,
    input_shape=(None, None, 3),
    encoder: str = "mobilenetv3large",
    encoder_weights=None,
    head_filters: int = 128,
    encoder_bn_momentum=None,
    name: str | None = None,
) -> keras.Model:
    """Build LR-ASPP: images [B, H, W, 3] in [0, 1] RGB -> float32 logits [B, H, W, num_classes].

    Args:
        num_classes: int. Number of output classes.
        input_shape: `(height, width, 3)`; height and width `None` or multiples of 32.
        encoder: "mobilenetv3large" or "mobilenetv3small".
        encoder_weights: None / "none", "imagenet", or a local weights file of the encoder.
        head_filters: int. Filters of the stride-16 branch (128 in the paper).
        encoder_bn_momentum: None (the application's 0.999) or the encoder's batch-norm momentum.
        name: str. The model's name; defaults to `lraspp_{encoder}`.

    Returns:
        A functional `keras.Model` whose encoder layers keep `keras.applications`' names.
    """
    if encoder not in LOW_LEVEL_LAYER:
        raise ValueError(f"lraspp: encoder must be one of {', '.join(LOW_LEVEL_LAYER)}, got {encoder!r}")
    if num_classes < 1 or head_filters < 1:
        raise ValueError(f"lraspp: num_classes and head_filters must be >= 1, got {num_classes}, {head_filters}")
    check_input_size(input_shape, 32, "lraspp")

    images = keras.Input(shape=tuple(input_shape), name="images")
    features, encoder_layers = build_encoder(encoder, images, weights=encoder_weights, output_stride=16,
                                             bn_momentum=encoder_bn_momentum)
    high = features[32]  # the dilated last stage: stride 16
    low = keras.Model(images, high).get_layer(LOW_LEVEL_LAYER[encoder]).output

    x = layers.Conv2D(head_filters, 1, use_bias=False, name="head_conv")(high)
    x = layers.BatchNormalization(name="head_bn")(x)
    x = layers.Activation("relu", name="head_relu")(x)
    gate = layers.GlobalAveragePooling2D(keepdims=True, name="head_pool")(high)
    gate = layers.Conv2D(head_filters, 1, use_bias=False, name="head_gate_conv")(gate)
    gate = layers.Activation("sigmoid", name="head_gate")(gate)
    x = layers.Multiply(name="head_gated")([x, BroadcastLike(name="head_gate_broadcast")([gate, x])])
    x = UpSample2D(2, interpolation="bilinear", name="head_up")(x)
    # The class scores and their up-sampling run in float32 under mixed precision.
    scores = layers.Add(name="scores", dtype="float32")([
        layers.Conv2D(num_classes, 1, dtype="float32", name="low_scores")(low),
        layers.Conv2D(num_classes, 1, dtype="float32", name="high_scores")(x),
    ])
    logits = UpSample2D(8, interpolation="bilinear", dtype="float32", name="logits")(scores)
    model = keras.Model(images, logits, name=name or f"lraspp_{encoder}")
    model.encoder_layer_names = tuple(encoder_layers)
    return model
