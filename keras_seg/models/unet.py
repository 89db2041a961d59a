"""UNet: a convolutional encoder-decoder with skip connections.

Ronneberger et al., "U-Net: Convolutional Networks for Biomedical Image Segmentation", 2015,
https://arxiv.org/abs/1505.04597. Unlike the paper, every convolution uses `same` padding, so the
logits have the input's height and width and no cropping of the skip connections is needed.
"""

from __future__ import annotations

import keras
from keras import layers

from keras_seg.models.layers import BatchNormalization, UpSample2D

ACTIVATIONS = ("relu", "silu")
UPSAMPLING = ("transpose", "bilinear")


def check_input_size(input_shape, stride: int, architecture: str):
    """Raise a ValueError when a known height or width is not a multiple of the model's total stride."""
    for axis, size in zip(("height", "width"), input_shape[:2]):
        if size is not None and (size <= 0 or size % stride):
            raise ValueError(
                f"{architecture}: input {axis} {size} is not a positive multiple of {stride} "
                f"(input_shape={tuple(input_shape)}); resize or crop the images to a multiple of {stride}"
            )


def conv_bn_activation(x, filters: int, activation: str, batch_norm: bool, name: str, index="", strides: int = 1):
    """A 3x3 convolution, batch norm (optional) and the activation: layers `{name}_conv{index}`,
    `{name}_bn{index}`, `{name}_{activation}{index}`."""
    # The batch norm's offset makes the convolution's bias redundant.
    x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=not batch_norm,
                      kernel_initializer="he_normal", name=f"{name}_conv{index}")(x)
    if batch_norm:
        x = BatchNormalization(name=f"{name}_bn{index}")(x)  # the fused kernel in training (layers.py)
    return layers.Activation(activation, name=f"{name}_{activation}{index}")(x)


def conv_block(x, filters: int, activation: str, batch_norm: bool, name: str):
    """Two 3x3 convolutions, each followed by batch norm (optional) and the activation."""
    for i in (1, 2):
        x = conv_bn_activation(x, filters, activation, batch_norm, name, index=i)
    return x


def build_unet(
    num_classes: int,
    input_shape=(None, None, 3),
    depth: int = 4,
    base_filters: int = 64,
    activation: str = "relu",
    batch_norm: bool = True,
    dropout: float = 0.0,
    upsampling: str = "transpose",
    stem_stride: int = 1,
    name: str = "unet",
) -> keras.Model:
    """Build a UNet that maps images [B, H, W, C] to float32 logits [B, H, W, num_classes].

    Args:
        num_classes: int. Number of output classes.
        input_shape: tuple `(height, width, channels)`. Height and width may be `None` (any size
            at call time), otherwise they must be multiples of `2**depth`.
        depth: int. Number of down-sampling (2x2 max-pool) levels; the paper uses 4.
        base_filters: int. Filters of the first level; each level below doubles them, so the
            bottleneck has `base_filters * 2**depth` (64 -> 1024 in the paper).
        activation: str. `"relu"` (the paper) or `"silu"`.
        batch_norm: bool. Batch normalization after every convolution (not in the paper).
        dropout: float. Dropout rate at the bottleneck, the end of the contracting path, where the
            paper puts it; 0 disables it.
        upsampling: str. `"transpose"`: a learned 2x2 transposed convolution (the paper's
            "up-convolution"); `"bilinear"`: bilinear 2x up-sampling followed by a 1x1 convolution.
        stem_stride: int. 1: the paper's UNet, its first level at the input's resolution. 2 or 4:
            a strided 3x3 convolution (`base_filters`, batch norm, activation) first brings the
            input down, the UNet runs at that resolution, and its logits are up-sampled
            bilinearly to the input size. The full-resolution level is the costliest to train
            on a CPU (its activations are the largest), so this trades fine detail for speed.
        name: str. The model's name.

    Returns:
        A functional `keras.Model`. Its `logits` layer (and `logits_up` after it, with a stem)
        computes in float32 whatever the dtype policy, so mixed-precision training and exported
        outputs get float32 logits.

    Example:

    ```python
    model = build_unet(num_classes=19, input_shape=(128, 256, 3), depth=4, base_filters=16)
    logits = model(images)  # [B, 128, 256, 19], float32
    ```
    """
    if num_classes < 1:
        raise ValueError(f"unet: num_classes must be >= 1, got {num_classes}")
    if depth < 1:
        raise ValueError(f"unet: depth must be >= 1, got {depth}")
    if base_filters < 1:
        raise ValueError(f"unet: base_filters must be >= 1, got {base_filters}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unet: unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    if upsampling not in UPSAMPLING:
        raise ValueError(f"unet: unknown upsampling {upsampling!r}; choose one of {', '.join(UPSAMPLING)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"unet: dropout must be in [0, 1), got {dropout}")
    if stem_stride not in (1, 2, 4):
        raise ValueError(f"unet: stem_stride must be 1, 2 or 4, got {stem_stride}")
    check_input_size(input_shape, 2**depth * stem_stride, "unet")

    inputs = keras.Input(shape=tuple(input_shape), name="images")

    x = inputs
    if stem_stride > 1:
        x = conv_bn_activation(x, base_filters, activation, batch_norm, "stem", strides=stem_stride)

    # Contracting path: keep each level's features for the skip connection, then halve the size.
    skips = []
    for level in range(depth):
        x = conv_block(x, base_filters * 2**level, activation, batch_norm, name=f"down{level + 1}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"down{level + 1}_pool")(x)

    x = conv_block(x, base_filters * 2**depth, activation, batch_norm, name="bottleneck")
    if dropout:
        x = layers.Dropout(dropout, name="bottleneck_dropout")(x)

    # Expanding path: double the size, halve the filters, concatenate the matching skip.
    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        prefix = f"up{level + 1}"
        if upsampling == "transpose":
            x = layers.Conv2DTranspose(filters, 2, strides=2, name=f"{prefix}_transpose")(x)
        else:
            x = UpSample2D(2, interpolation="bilinear", name=f"{prefix}_bilinear")(x)
            x = layers.Conv2D(filters, 1, name=f"{prefix}_project")(x)
        x = layers.Concatenate(name=f"{prefix}_concat")([skips[level], x])
        x = conv_block(x, filters, activation, batch_norm, name=prefix)

    # float32 whatever the policy: keeps softmax/loss stable under mixed_float16, and exports float32.
    logits = layers.Conv2D(num_classes, 1, dtype="float32", name="logits")(x)
    if stem_stride > 1:
        logits = UpSample2D(stem_stride, interpolation="bilinear", dtype="float32", name="logits_up")(logits)
    return keras.Model(inputs, logits, name=name)
