"""DDRNet-23-slim: a deep dual-resolution network for real-time segmentation, trained from scratch.

Hong et al., "Deep Dual-resolution Networks for Real-time and Accurate Semantic Segmentation of Road
Scenes", 2021, https://arxiv.org/abs/2101.06085 (the authors' DDRNet_23_slim: 32 base filters, DAPPM
of 128, head of 64). A stride-8 stem of basic residual blocks splits into two branches: a
high-resolution one that stays at stride 8 (64 filters) and a low-resolution one down to stride 64
(128 -> 512); twice, the low branch is squeezed (1x1) and up-sampled into the high one, and the high
one strided (3x3) into the low one. The Deep Aggregation Pyramid Pooling Module (DAPPM) pools the
stride-64 features at 5 / 9 / 17 (strides 2 / 4 / 8) and globally, each scale refined by a 3x3
convolution on the sum with the previous one; its output is added to the high branch, and a head
(3x3 of 64, then 1x1 class scores) gives stride-8 scores, up-sampled bilinearly to the input size.
Conv / batch norm / ReLU only (plus average pooling). The auxiliary head (loss weight 0.4, as
MMSegmentation's config) reads the high branch after the first exchange; it exists only in the
training model.
"""

from __future__ import annotations

import keras
from keras import layers

from keras_seg.models.deeplab import BroadcastLike
from keras_seg.models.unet import check_input_size


def _conv_bn(x, filters, kernel, name, strides=1, relu=True):
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False,
                      kernel_initializer="he_normal", name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x) if relu else x


def _basic_block(x, filters, name, strides=1, last=False):
    """Two 3x3 conv-BN with a residual (projected when the shape changes); the last block of a
    stage has no ReLU after the sum (the branches exchange before their activation)."""
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(x, filters, 1, f"{name}_shortcut", strides=strides, relu=False)
    y = _conv_bn(x, filters, 3, f"{name}_1", strides=strides)
    y = _conv_bn(y, filters, 3, f"{name}_2", relu=False)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return y if last else layers.Activation("relu", name=f"{name}_out")(y)


def _bottleneck(x, filters, name, strides=1):
    """1x1 - 3x3 (strided) - 1x1 to 2 x filters, with a projected residual and no final ReLU."""
    shortcut = _conv_bn(x, 2 * filters, 1, f"{name}_shortcut", strides=strides, relu=False)
    y = _conv_bn(x, filters, 1, f"{name}_1")
    y = _conv_bn(y, filters, 3, f"{name}_2", strides=strides)
    y = _conv_bn(y, 2 * filters, 1, f"{name}_3", relu=False)
    return layers.Add(name=f"{name}_add")([y, shortcut])


def _stage(x, filters, blocks, name, strides=1):
    x = layers.Activation("relu", name=f"{name}_in_relu")(x)
    for index in range(blocks):
        x = _basic_block(x, filters, f"{name}_block{index + 1}", strides if index == 0 else 1,
                         last=index == blocks - 1)
    return x


def _bn_relu_conv(x, filters, kernel, name):
    """The pre-activation unit of DAPPM and the heads: batch norm, ReLU, convolution."""
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    x = layers.Activation("relu", name=f"{name}_relu")(x)
    return layers.Conv2D(filters, kernel, padding="same", use_bias=False, kernel_initializer="he_normal",
                         name=f"{name}_conv")(x)


def _dappm(x, filters, out_filters, name):
    """DAPPM: the stride-64 features at 1x and pooled (5/2, 9/4, 17/8, global), each pooled scale
    up-sampled back and refined by a 3x3 on its sum with the previous scale; concatenated, projected
    to `out_filters`, plus a 1x1 shortcut."""
    scales = [_bn_relu_conv(x, filters, 1, f"{name}_scale0")]
    for index, (pool, stride) in enumerate(((5, 2), (9, 4), (17, 8)), start=1):
        pooled = layers.AveragePooling2D(pool, strides=stride, padding="same", name=f"{name}_pool{index}")(x)
        pooled = _bn_relu_conv(pooled, filters, 1, f"{name}_scale{index}")
        # Pooled maps are ceil(size / stride): resized back to the exact size (a fixed input size).
        pooled = layers.Resizing(x.shape[1], x.shape[2], interpolation="bilinear", name=f"{name}_up{index}")(pooled)
        scales.append(_bn_relu_conv(layers.Add(name=f"{name}_sum{index}")([pooled, scales[-1]]), filters, 3,
                                    f"{name}_process{index}"))
    pooled = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_pool4")(x)
    pooled = _bn_relu_conv(pooled, filters, 1, f"{name}_scale4")
    pooled = BroadcastLike(name=f"{name}_up4")([pooled, x])
    scales.append(_bn_relu_conv(layers.Add(name=f"{name}_sum4")([pooled, scales[-1]]), filters, 3,
                                f"{name}_process4"))
    y = _bn_relu_conv(layers.Concatenate(name=f"{name}_concat")(scales), out_filters, 1, f"{name}_compression")
    return layers.Add(name=f"{name}_out")([y, _bn_relu_conv(x, out_filters, 1, f"{name}_shortcut")])


def _seg_head(x, filters, num_classes, upsample, name):
    x = _bn_relu_conv(x, filters, 3, f"{name}_conv1")
    x = layers.BatchNormalization(name=f"{name}_bn2")(x)
    x = layers.Activation("relu", name=f"{name}_relu2")(x)
    # The class scores and their up-sampling run in float32 under mixed precision.
    x = layers.Conv2D(num_classes, 1, dtype="float32", name=f"{name}_scores")(x)
    return layers.UpSampling2D(upsample, interpolation="bilinear", dtype="float32", name=f"{name}_logits")(x)


def build_ddrnet(
    num_classes: int,
    input_shape=(None, None, 3),
    base_filters: int = 32,
    dappm_filters: int = 128,
    head_filters: int = 64,
    aux_weight: float = 0.0,
    with_aux: bool = False,
    name: str = "ddrnet23_slim",
) -> keras.Model:
    """Build DDRNet-23 (slim at the defaults): images [B, H, W, C] in [0, 1] -> float32 logits.

    Args:
        num_classes: int. Number of output classes.
        input_shape: `(height, width, channels)`; height and width `None` or multiples of 64.
        base_filters: int. The stem's filters (32 slim, 64 full DDRNet-23); the high branch has
            2x, the low branch 4x, 8x, 16x (and 32x after its bottleneck).
        dappm_filters: int. Filters of DAPPM's scales.
        head_filters: int. Filters of the segmentation heads' 3x3 convolution.
        aux_weight: float. The auxiliary head's loss weight (0: none), read by the trainer.
        with_aux: bool. Return the training model, whose outputs are `[logits, aux_logits]`
            (only when `aux_weight > 0`).
        name: str. The model's name.

    Returns:
        A functional `keras.Model`.
    """
    if num_classes < 1 or min(base_filters, dappm_filters, head_filters) < 1 or aux_weight < 0:
        raise ValueError(f"ddrnet: num_classes and filters must be >= 1 and aux_weight >= 0, got {num_classes}, "
                         f"{base_filters}, {dappm_filters}, {head_filters}, {aux_weight}")
    check_input_size(input_shape, 64, "ddrnet")
    if None in tuple(input_shape[:2]):
        raise ValueError(f"ddrnet: needs a fixed input size (its pyramid pooling resizes to it), got {input_shape}")
    width = base_filters
    images = keras.Input(shape=tuple(input_shape), name="images")
    x = _conv_bn(images, width, 3, "stem1", strides=2)
    x = _conv_bn(x, width, 3, "stem2", strides=2, relu=False)
    x = _stage(x, width, 2, "layer1")                       # stride 4
    x = _stage(x, 2 * width, 2, "layer2", strides=2)        # stride 8: the high branch starts here
    low = _stage(x, 4 * width, 2, "layer3", strides=2)      # stride 16
    high = _stage(x, 2 * width, 2, "layer3_high")           # stride 8

    # First exchange: the high branch strided into the low, the low squeezed and up-sampled into the high.
    down = _conv_bn(layers.Activation("relu", name="down3_in_relu")(high), 4 * width, 3, "down3", strides=2,
                    relu=False)
    squeezed = _conv_bn(layers.Activation("relu", name="compression3_in_relu")(low), 2 * width, 1, "compression3",
                        relu=False)
    low = layers.Add(name="exchange3_low")([low, down])
    high = layers.Add(name="exchange3_high")([
        high, layers.UpSampling2D(2, interpolation="bilinear", name="compression3_up")(squeezed)])
    aux_features = high

    low = _stage(low, 8 * width, 2, "layer4", strides=2)    # stride 32
    high = _stage(high, 2 * width, 2, "layer4_high")
    down = _conv_bn(layers.Activation("relu", name="down4_in_relu")(high), 4 * width, 3, "down4a", strides=2)
    down = _conv_bn(down, 8 * width, 3, "down4b", strides=2, relu=False)
    squeezed = _conv_bn(layers.Activation("relu", name="compression4_in_relu")(low), 2 * width, 1, "compression4",
                        relu=False)
    low = layers.Add(name="exchange4_low")([low, down])
    high = layers.Add(name="exchange4_high")([
        high, layers.UpSampling2D(4, interpolation="bilinear", name="compression4_up")(squeezed)])

    high = _bottleneck(layers.Activation("relu", name="layer5_high_in_relu")(high), 2 * width, "layer5_high")
    low = _bottleneck(layers.Activation("relu", name="layer5_in_relu")(low), 8 * width, "layer5", strides=2)
    context = _dappm(low, dappm_filters, 4 * width, "dappm")  # stride 64
    context = layers.UpSampling2D(8, interpolation="bilinear", name="dappm_up")(context)
    fused = layers.Add(name="fused")([high, context])
    logits = _seg_head(fused, head_filters, num_classes, 8, "head")
    if not (with_aux and aux_weight > 0):
        return keras.Model(images, logits, name=name)
    aux = _seg_head(aux_features, head_filters, num_classes, 8, "aux_head")
    return keras.Model(images, [logits, aux], name=name)
