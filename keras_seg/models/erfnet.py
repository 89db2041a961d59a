"""ERFNet: an efficient residual factorized ConvNet for real-time segmentation, trained from scratch.

Romera et al., "ERFNet: Efficient Residual Factorized ConvNet for Real-Time Semantic Segmentation",
IEEE T-ITS 2018, with the authors' code (Eromera/erfnet_pytorch, `train/erfnet.py`) as the reference
of the layer sizes. The layers follow the paper's table (1-23):

- encoder: downsamplers (1, 2, 8), each the concatenation of a strided 3x3 convolution (to the new
  width minus the input's) and a 2x2 max-pool of the input, then batch norm and ReLU; 5
  non-bottleneck-1D blocks at 64 filters (3-7, stride 4), 8 at 128 (9-16, stride 8) dilated 2, 4,
  8, 16 twice;
- decoder: a 3x3 transposed convolution (stride 2), batch norm, ReLU (17, 20), each followed by 2
  non-bottleneck-1D blocks (18-19 at 64 filters, 21-22 at 16); a 2x2 transposed convolution
  (stride 2) to the classes (23).

A non-bottleneck-1D block factorizes two 3x3 convolutions into 3x1 then 1x3 each: 3x1, ReLU, 1x3,
batch norm, ReLU, 3x1 and 1x3 dilated, batch norm, spatial dropout, then the input added and ReLU.
Every convolution has a bias, as the reference's do (redundant before a batch norm, but part of its
parameter count: 2,064,191 trainable at 19 classes, tests/test_erfnet.py). The reference also holds
an encoder-only classifier (128 x C + C) for its first training stage, not in the full model's
forward pass: it is left out here. Strided convolutions pad Keras' way ("same": the extra row and
column at the bottom and right; PyTorch pads one on each side), a half-pixel shift that changes no
size or parameter.
"""

from __future__ import annotations

import keras
from keras import layers

from keras_seg.models.unet import check_input_size

# The encoder's second stage (layers 9-16): the dilations of the paper's table, twice.
DILATIONS = (2, 4, 8, 16, 2, 4, 8, 16)


def _downsampler(x, filters, name):
    """A strided 3x3 convolution beside a 2x2 max-pool, concatenated to `filters` channels."""
    conv = layers.Conv2D(filters - x.shape[-1], 3, strides=2, padding="same", kernel_initializer="he_normal",
                         name=f"{name}_conv")(x)
    pooled = layers.MaxPooling2D(2, strides=2, padding="same", name=f"{name}_pool")(x)
    x = layers.Concatenate(name=f"{name}_concat")([conv, pooled])
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def _non_bottleneck_1d(x, dilation, dropout, name):
    """Two factorized 3x3 convolutions (3x1 then 1x3), the second pair dilated, with a residual."""
    filters = x.shape[-1]
    y = x
    for index, rate in ((1, 1), (2, dilation)):
        y = layers.Conv2D(filters, (3, 1), padding="same", dilation_rate=(rate, 1), kernel_initializer="he_normal",
                          name=f"{name}_conv3x1_{index}")(y)
        y = layers.Activation("relu", name=f"{name}_relu3x1_{index}")(y)
        y = layers.Conv2D(filters, (1, 3), padding="same", dilation_rate=(1, rate), kernel_initializer="he_normal",
                          name=f"{name}_conv1x3_{index}")(y)
        y = layers.BatchNormalization(name=f"{name}_bn{index}")(y)
        if index == 1:
            y = layers.Activation("relu", name=f"{name}_relu1x3_1")(y)
    if dropout > 0:
        y = layers.SpatialDropout2D(dropout, name=f"{name}_dropout")(y)
    y = layers.Add(name=f"{name}_add")([y, x])
    return layers.Activation("relu", name=f"{name}_out")(y)


def _upsampler(x, filters, name):
    x = layers.Conv2DTranspose(filters, 3, strides=2, padding="same", kernel_initializer="he_normal",
                               name=f"{name}_deconv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def build_erfnet(
    num_classes: int,
    input_shape=(None, None, 3),
    encoder_dropout=(0.03, 0.3),
    name: str = "erfnet",
) -> keras.Model:
    """Build ERFNet: images [B, H, W, C] in [0, 1] -> float32 logits [B, H, W, num_classes].

    Args:
        num_classes: int. Number of output classes.
        input_shape: `(height, width, channels)`; height and width `None` or multiples of 8.
        encoder_dropout: (float, float). Spatial dropout of the non-bottleneck-1D blocks at 64 and
            at 128 filters (the reference code's 0.03 and 0.3; the decoder has none).
        name: str. The model's name.

    Returns:
        A functional `keras.Model`; its layers are named after the paper's table (`layer1_*` ... `layer22_*`, and
        `logits`, layer 23).
    """
    if num_classes < 1:
        raise ValueError(f"erfnet: num_classes must be >= 1, got {num_classes}")
    if len(encoder_dropout) != 2 or not all(0 <= rate < 1 for rate in encoder_dropout):
        raise ValueError(f"erfnet: encoder_dropout must be two rates in [0, 1), got {encoder_dropout!r}")
    check_input_size(input_shape, 8, "erfnet")
    low_dropout, high_dropout = encoder_dropout

    images = keras.Input(shape=tuple(input_shape), name="images")
    x = _downsampler(images, 16, "layer1")                    # stride 2
    x = _downsampler(x, 64, "layer2")                         # stride 4
    for number in range(3, 8):
        x = _non_bottleneck_1d(x, 1, low_dropout, f"layer{number}")
    x = _downsampler(x, 128, "layer8")                        # stride 8
    for number, dilation in zip(range(9, 17), DILATIONS):
        x = _non_bottleneck_1d(x, dilation, high_dropout, f"layer{number}")

    x = _upsampler(x, 64, "layer17")                          # stride 4
    for number in (18, 19):
        x = _non_bottleneck_1d(x, 1, 0.0, f"layer{number}")
    x = _upsampler(x, 16, "layer20")                          # stride 2
    for number in (21, 22):
        x = _non_bottleneck_1d(x, 1, 0.0, f"layer{number}")
    # The class scores run in float32 under mixed precision.
    logits = layers.Conv2DTranspose(num_classes, 2, strides=2, dtype="float32", name="logits")(x)
    return keras.Model(images, logits, name=name)
