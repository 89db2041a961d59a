"""UNet over an ImageNet encoder: segmentation_models' UNet decoder on `keras.applications` features.

The decoder of segmentation_models(_pytorch)'s `Unet`: from the encoder's stride-32 features, five
blocks each up-sample by 2 (nearest), concatenate the encoder's features at that stride (when the
encoder has them: ConvNeXt has no stride-2 feature, and that block goes without a skip), and apply
two 3x3 convolution - batch norm - ReLU. A 3x3 convolution gives the class logits at the input's
resolution.
"""

from __future__ import annotations

import keras
from keras import layers

from keras_seg.models.encoders import build_encoder
from keras_seg.models.layers import UpSample2D
from keras_seg.models.unet import check_input_size, conv_bn_activation

DECODER_FILTERS = (256, 128, 64, 32, 16)


def build_encoder_unet(
    num_classes: int,
    input_shape=(None, None, 3),
    encoder: str = "resnet50",
    encoder_weights=None,
    decoder_filters=DECODER_FILTERS,
    encoder_bn_momentum=None,
    name: str | None = None,
) -> keras.Model:
    """Build a UNet with an ImageNet encoder: images [B, H, W, 3] in [0, 1] RGB -> float32 logits.

    Args:
        num_classes: int. Number of output classes.
        input_shape: `(height, width, 3)`; height and width `None` or multiples of 32.
        encoder: str. A key of `keras_seg.models.encoders.ENCODERS`.
        encoder_weights: None / "none", "imagenet", or a local weights file.
        decoder_filters: five ints, the decoder blocks' filters from stride 16 to stride 1.
        encoder_bn_momentum: None (the application's) or the encoder's batch-norm momentum.
        name: str. The model's name; defaults to `unet_{encoder}`.

    Returns:
        A functional `keras.Model` whose encoder layers keep `keras.applications`' names.

    Example:

    ```python
    model = build_encoder_unet(19, (256, 512, 3), encoder="resnet50", encoder_weights="imagenet")
    ```
    """
    if num_classes < 1:
        raise ValueError(f"unet: num_classes must be >= 1, got {num_classes}")
    decoder_filters = tuple(int(f) for f in decoder_filters)
    if len(decoder_filters) != 5 or min(decoder_filters) < 1:
        raise ValueError(f"unet: decoder_filters must be five positive ints (strides 16 to 1), got {decoder_filters}")
    check_input_size(input_shape, 32, "unet")

    images = keras.Input(shape=tuple(input_shape), name="images")
    features, encoder_layers = build_encoder(encoder, images, weights=encoder_weights,
                                             bn_momentum=encoder_bn_momentum)
    x = features[32]
    for index, (stride, filters) in enumerate(zip((16, 8, 4, 2, 1), decoder_filters), start=1):
        block = f"decoder_block{index}"
        x = UpSample2D(2, interpolation="nearest", name=f"{block}_up")(x)
        skip = features.get(stride)
        if skip is not None:
            x = layers.Concatenate(name=f"{block}_concat")([x, skip])
        x = conv_bn_activation(x, filters, "relu", True, block, index=1)
        x = conv_bn_activation(x, filters, "relu", True, block, index=2)
    logits = layers.Conv2D(num_classes, 3, padding="same", dtype="float32", name="logits")(x)
    model = keras.Model(images, logits, name=name or f"unet_{encoder}")
    model.encoder_layer_names = tuple(encoder_layers)
    return model
