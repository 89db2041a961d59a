"""DeepLabV3+: atrous spatial pyramid pooling over an ImageNet encoder, and a light decoder.

Chen et al., "Encoder-Decoder with Atrous Separable Convolution for Semantic Image Segmentation",
2018, https://arxiv.org/abs/1802.02611. ASPP on the encoder's deepest features (a 1x1 branch,
three 3x3 branches dilated 6 / 12 / 18 at output stride 16, and image pooling), projected to 256;
up-sampled to stride 4 and joined with the stride-4 features (projected to 48); two 3x3
convolutions, the class scores, and a bilinear up-sampling to the input size. The ResNet encoders
run at output stride 16 (their last stage rebuilt dilated, with the same weights), the others at
32, where the rates halve (3 / 6 / 9) to cover the same image area.

By default (`separable=True`) the head is segmentation_models_pytorch 0.6.0's `DeepLabV3Plus`
head, layer for layer: the three dilated ASPP branches are depthwise-separable (depthwise 3x3, then
pointwise 1x1, no norm between, as SMP's `SeparableConv2d`), a separable 3x3 follows the ASPP
projection, and the decoder has one separable 3x3 after the join. `separable=False` is the earlier
plain head: plain 3x3 ASPP branches, no convolution after the projection, two plain 3x3 decoder
convolutions (as MMSegmentation's `ASPPHead` and keras-hub; about 14M parameters more over ResNet-50).

An optional auxiliary FCN head on the stride-16 features (MMSegmentation's DeepLab configs: loss
weight 0.4) helps the encoder's middle stages train; it exists only in the training model.
"""

from __future__ import annotations

import keras
from keras import layers, ops

from keras_seg.models.encoders import build_encoder, get_encoder
from keras_seg.models.layers import UpSample2D
from keras_seg.models.unet import check_input_size


@keras.saving.register_keras_serializable(package="keras_seg")
class BroadcastLike(layers.Layer):
    """`[pooled, reference]` -> pooled [B, 1, 1, C] repeated over the reference's height and width."""

    def call(self, inputs):
        pooled, reference = inputs
        shape = ops.shape(reference)
        return ops.broadcast_to(pooled, (shape[0], shape[1], shape[2], pooled.shape[-1]))

    def compute_output_shape(self, input_shapes):
        pooled, reference = input_shapes
        return (reference[0], reference[1], reference[2], pooled[-1])


def _conv_bn_relu(x, filters, kernel, name, dilation=1, separable=False):
    if separable:  # SMP's SeparableConv2d: depthwise kxk then pointwise 1x1, no bias, no norm between
        x = layers.SeparableConv2D(filters, kernel, padding="same", dilation_rate=dilation, use_bias=False,
                                   depthwise_initializer="he_normal", pointwise_initializer="he_normal",
                                   name=f"{name}_conv")(x)
    else:
        x = layers.Conv2D(filters, kernel, padding="same", dilation_rate=dilation, use_bias=False,
                          kernel_initializer="he_normal", name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def build_deeplabv3plus(
    num_classes: int,
    input_shape=(None, None, 3),
    encoder: str = "resnet50",
    encoder_weights=None,
    output_stride: int | None = None,
    aspp_filters: int = 256,
    aspp_rates=None,
    low_level_filters: int = 48,
    decoder_filters: int = 256,
    separable: bool = True,
    dropout: float = 0.1,
    aux_weight: float = 0.0,
    encoder_bn_momentum=None,
    with_aux: bool = False,
    name: str | None = None,
) -> keras.Model:
    """Build DeepLabV3+: images [B, H, W, 3] in [0, 1] RGB -> float32 logits [B, H, W, num_classes].

    Args:
        num_classes: int. Number of output classes.
        input_shape: `(height, width, 3)`; height and width `None` or multiples of 32.
        encoder: str. A key of `keras_seg.models.encoders.ENCODERS`.
        encoder_weights: None / "none", "imagenet", or a local weights file.
        output_stride: 16 or 32; default 16 for the ResNet encoders (dilated last stage), else 32.
        aspp_filters: int. Filters of each ASPP branch and of its projection.
        aspp_rates: three dilation rates; default (6, 12, 18) at output stride 16, (3, 6, 9) at 32.
        low_level_filters: int. Filters of the stride-4 features' projection.
        decoder_filters: int. Filters of the decoder's 3x3 convolution(s).
        separable: bool. SMP's head with depthwise-separable 3x3 convolutions (default), or the
            earlier plain head (see the module docstring).
        dropout: float. Dropout after the ASPP projection and before the class scores.
        aux_weight: float. The auxiliary head's loss weight (0: no auxiliary head); recorded
            here so that the trainer reads it from the model config.
        encoder_bn_momentum: None (the application's) or the encoder's batch-norm momentum.
        with_aux: bool. Return the training model, whose outputs are `[logits, aux_logits]`
            (only when `aux_weight > 0`); the default model has the logits only.
        name: str. The model's name; defaults to `deeplabv3plus_{encoder}`.

    Returns:
        A functional `keras.Model` whose encoder layers keep `keras.applications`' names.
    """
    if num_classes < 1:
        raise ValueError(f"deeplabv3plus: num_classes must be >= 1, got {num_classes}")
    if output_stride is None:
        output_stride = 16 if get_encoder(encoder).dilatable else 32
    if aspp_rates is None:
        aspp_rates = tuple(rate * 16 // output_stride for rate in (6, 12, 18))
    if len(tuple(aspp_rates)) != 3:
        raise ValueError(f"deeplabv3plus: aspp_rates must be three ints, got {aspp_rates}")
    if not 0.0 <= dropout < 1.0 or aux_weight < 0:
        raise ValueError(f"deeplabv3plus: dropout must be in [0, 1) and aux_weight >= 0, got {dropout}, {aux_weight}")
    check_input_size(input_shape, 32, "deeplabv3plus")

    images = keras.Input(shape=tuple(input_shape), name="images")
    features, encoder_layers = build_encoder(encoder, images, weights=encoder_weights, output_stride=output_stride,
                                             bn_momentum=encoder_bn_momentum)
    deepest = features[32]

    branches = [_conv_bn_relu(deepest, aspp_filters, 1, "aspp_1x1")]
    for rate in aspp_rates:
        branches.append(_conv_bn_relu(deepest, aspp_filters, 3, f"aspp_rate{rate}", dilation=int(rate),
                                      separable=separable))
    pooled = layers.GlobalAveragePooling2D(keepdims=True, name="aspp_pool")(deepest)
    pooled = _conv_bn_relu(pooled, aspp_filters, 1, "aspp_pool_proj")
    branches.append(BroadcastLike(name="aspp_pool_broadcast")([pooled, deepest]))
    x = layers.Concatenate(name="aspp_concat")(branches)
    x = _conv_bn_relu(x, aspp_filters, 1, "aspp_proj")
    if dropout:
        x = layers.Dropout(dropout, name="aspp_dropout")(x)
    if separable:
        x = _conv_bn_relu(x, aspp_filters, 3, "aspp_sep", separable=True)

    x = UpSample2D(output_stride // 4, interpolation="bilinear", name="decoder_up")(x)
    low_level = _conv_bn_relu(features[4], low_level_filters, 1, "decoder_low_level")
    x = layers.Concatenate(name="decoder_concat")([x, low_level])
    if separable:
        x = _conv_bn_relu(x, decoder_filters, 3, "decoder_sep", separable=True)
    else:
        x = _conv_bn_relu(x, decoder_filters, 3, "decoder_conv1")
        x = _conv_bn_relu(x, decoder_filters, 3, "decoder_conv2")
    if dropout:
        x = layers.Dropout(dropout, name="decoder_dropout")(x)
    # The class scores and their up-sampling run in float32 under mixed precision.
    scores = layers.Conv2D(num_classes, 1, dtype="float32", name="scores")(x)
    logits = UpSample2D(4, interpolation="bilinear", dtype="float32", name="logits")(scores)
    model_name = name or f"deeplabv3plus_{encoder}"
    if not (with_aux and aux_weight > 0):
        model = keras.Model(images, logits, name=model_name)
    else:
        # MMSegmentation's FCNHead: one 3x3 convolution (256), dropout, class scores.
        aux = _conv_bn_relu(features[16], 256, 3, "aux_head")
        if dropout:
            aux = layers.Dropout(dropout, name="aux_dropout")(aux)
        aux = layers.Conv2D(num_classes, 1, dtype="float32", name="aux_scores")(aux)
        aux = UpSample2D(16, interpolation="bilinear", dtype="float32", name="aux_logits")(aux)
        model = keras.Model(images, [logits, aux], name=model_name)
    model.encoder_layer_names = tuple(encoder_layers)
    return model
