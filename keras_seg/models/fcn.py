"""FCN: fully convolutional networks with 32s / 16s / 8s skip heads.

Long, Shelhamer and Darrell, "Fully Convolutional Networks for Semantic Segmentation", 2015,
https://arxiv.org/abs/1411.4038. The encoder is `keras.applications.VGG16` (the paper's) or
`keras.applications.ResNet50`, with random weights, ImageNet's or a local file's
(`keras_seg.models.encoders`). The model takes images in [0, 1] RGB, like every keras-seg model,
and converts them inside, before the encoder, to the 0-255 BGR minus ImageNet means that these
encoders' ImageNet weights expect (`preprocessing="caffe"`). Differences from the paper: `same` padding instead of
the 100-pixel input padding and crops, and fixed bilinear up-sampling where the paper learns
deconvolutions initialised to bilinear.
"""

from __future__ import annotations

import keras
from keras import layers

from keras_seg.models.encoders import get_encoder, load_encoder_weights, resolve_weights
from keras_seg.models.layers import UpSample2D
from keras_seg.models.preprocessing import CaffePreprocessing
from keras_seg.models.unet import check_input_size

# backbone -> feature layers at strides 8, 16 and 32 (the paper's pool3 / pool4 / pool5 for VGG16)
ENCODERS = {
    "vgg16": ("block3_pool", "block4_pool", "block5_pool"),
    "resnet50": ("conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
}
HEADS = ("32s", "16s", "8s")
PREPROCESSING = ("caffe", "none")


def build_fcn(
    num_classes: int,
    input_shape=(None, None, 3),
    backbone: str = "vgg16",
    head: str = "8s",
    fc_filters: int = 4096,
    fc_kernel: int = 7,
    dropout: float = 0.5,
    encoder_weights=None,
    preprocessing: str = "caffe",
    name: str | None = None,
) -> keras.Model:
    """Build an FCN that maps images [B, H, W, C] to float32 logits [B, H, W, num_classes].

    The stride-32 encoder output goes through the paper's convolutionalised classifier, `fc6`
    (`fc_kernel` x `fc_kernel`, `fc_filters`) and `fc7` (1x1, `fc_filters`), then a 1x1 class
    score. FCN-16s adds a score of the stride-16 features after 2x up-sampling, FCN-8s also one of
    the stride-8 features; the sum is up-sampled to the input size.

    Args:
        num_classes: int. Number of output classes.
        input_shape: tuple `(height, width, channels)`. Height and width may be `None`,
            otherwise they must be multiples of 32.
        backbone: str. `"vgg16"` or `"resnet50"` (`keras.applications`).
        head: str. `"32s"`, `"16s"` or `"8s"`: the finest encoder stride that feeds the logits.
        fc_filters: int. Filters of `fc6` and `fc7` (4096 in the paper).
        fc_kernel: int. Kernel size of `fc6` (7 in the paper, VGG16's first dense layer).
        dropout: float. Dropout after `fc6` and `fc7` (0.5 in the paper); 0 disables it.
        encoder_weights: None / "none" (random initialisation), "imagenet", or the path of a
            local `include_top=False` weights file (`keras_seg.models.encoders`).
        preprocessing: str. `"caffe"`: images in [0, 1] RGB are turned into what the ImageNet
            weights expect (0-255 BGR minus the ImageNet means) inside the model; `"none"`: the
            encoder sees the [0, 1] RGB images as they are (FCN runs of keras-seg 0.1's first
            round, whose recorded configs lack this argument, were trained so).
        name: str. The model's name; defaults to e.g. `fcn8s_vgg16`.

    Returns:
        A functional `keras.Model`. The score path (class scores, their sums and the final
        up-sampling, named `logits`) computes in float32 whatever the dtype policy.

    Example:

    ```python
    model = build_fcn(num_classes=21, input_shape=(320, 320, 3), backbone="resnet50", head="8s")
    ```
    """
    if num_classes < 1:
        raise ValueError(f"fcn: num_classes must be >= 1, got {num_classes}")
    if backbone not in ENCODERS:
        raise ValueError(f"fcn: unknown backbone {backbone!r}; choose one of {', '.join(ENCODERS)}")
    if head not in HEADS:
        raise ValueError(f"fcn: unknown head {head!r}; choose one of {', '.join(HEADS)}")
    if fc_filters < 1 or fc_kernel < 1:
        raise ValueError(f"fcn: fc_filters and fc_kernel must be >= 1, got {fc_filters} and {fc_kernel}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"fcn: dropout must be in [0, 1), got {dropout}")
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"fcn: preprocessing must be one of {', '.join(PREPROCESSING)}, got {preprocessing!r}")
    check_input_size(input_shape, 32, "fcn")
    path = resolve_weights(backbone, encoder_weights)

    inputs = keras.Input(shape=tuple(input_shape), name="images")
    # In float32 whatever the policy: in bfloat16, 0-255 minus the means would be off by up to 0.5.
    encoder_input = (CaffePreprocessing(name="caffe_preprocessing", dtype="float32")(inputs)
                     if preprocessing == "caffe" else inputs)
    encoder = getattr(keras.applications, get_encoder(backbone).application)(
        include_top=False, weights=None, input_tensor=encoder_input)
    if path is not None:
        load_encoder_weights(encoder, path, backbone)
    stride8, stride16, stride32 = (encoder.get_layer(n).output for n in ENCODERS[backbone])

    x = layers.Conv2D(fc_filters, fc_kernel, padding="same", activation="relu", name="fc6")(stride32)
    if dropout:
        x = layers.Dropout(dropout, name="fc6_dropout")(x)
    x = layers.Conv2D(fc_filters, 1, activation="relu", name="fc7")(x)
    if dropout:
        x = layers.Dropout(dropout, name="fc7_dropout")(x)

    # The score path runs in float32: logits, and the sums that make them, stay float32 under mixed precision.
    score = layers.Conv2D(num_classes, 1, dtype="float32", name="score_fc7")(x)
    if head in ("16s", "8s"):
        score = UpSample2D(2, interpolation="bilinear", dtype="float32", name="score_fc7_up")(score)
        pool4 = layers.Conv2D(num_classes, 1, dtype="float32", name="score_pool4")(stride16)
        score = layers.Add(dtype="float32", name="fuse_pool4")([score, pool4])
    if head == "8s":
        score = UpSample2D(2, interpolation="bilinear", dtype="float32", name="fuse_pool4_up")(score)
        pool3 = layers.Conv2D(num_classes, 1, dtype="float32", name="score_pool3")(stride8)
        score = layers.Add(dtype="float32", name="fuse_pool3")([score, pool3])

    stride = {"32s": 32, "16s": 16, "8s": 8}[head]
    logits = UpSample2D(stride, interpolation="bilinear", dtype="float32", name="logits")(score)
    model = keras.Model(inputs, logits, name=name or f"fcn{head}_{backbone}")
    model.encoder_layer_names = tuple(layer.name for layer in encoder.layers
                                      if not isinstance(layer, (keras.layers.InputLayer, CaffePreprocessing)))
    return model
