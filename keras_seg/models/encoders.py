"""ImageNet encoders from `keras.applications`: which layers feed a decoder, and their weights.

One table, `ENCODERS`, names for each encoder the layer tapped at each stride (2, 4, 8, 16, 32):
the last layer whose output has that stride, so the richest features at that resolution (an
expansion's activation just before a strided depthwise convolution, where there is one). An
encoder without a stride says so with `None`: ConvNeXt's stem has stride 4, so it has no stride-2
feature, and decoders skip that level. MobileNetV3 names its activations by a global counter
(`re_lu_5` in one build, `re_lu_17` in the next): it is tapped by position, counted from the end
of the application's layers (the same in every build, whatever comes before the encoder).

`build_encoder` puts the application's layers into the caller's functional graph under their
own names (`model.get_layer("conv4_block6_out")` works on the segmentation model), after the
encoder's preprocessing as a registered layer: every keras-seg model takes images in [0, 1] RGB.

Weights (`encoder_weights`): None / "none" (random), "imagenet" (downloaded once by
`keras.utils.get_file` into `$KERAS_HOME/models`, as `keras.applications` does), or the path of a
local file: a Keras 3 `.weights.h5` or a legacy `.h5` such as the official
`*_notop.h5` releases. A file that does not fit the encoder is refused with a one-line
`EncoderWeightsError` naming the file and the encoder.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import keras
from keras import layers

from keras_seg.models.preprocessing import CaffePreprocessing, ScaleTo255

STRIDES = (2, 4, 8, 16, 32)
WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


class EncoderWeightsError(ValueError):
    """Encoder weights that cannot be had or do not fit (a one-line message)."""


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    application: str          # the keras.applications constructor
    preprocessing: str        # "caffe": 0-255 BGR minus the ImageNet means; "0-255": the application's own layers
    features: dict            # stride -> layer name, or position from the end of the application's layers, or None
    imagenet_file: str        # the include_top=False weights file keras.applications downloads
    imagenet_url: str
    imagenet_hash: str
    dilatable: bool = False   # the last stage can be rebuilt dilated (output stride 16)
    # Output stride 16 on request only (MobileNetV3, for LR-ASPP); DeepLabV3+ keeps it at 32 by default.
    dilatable_on_request: bool = False


ENCODERS = {
    "resnet50": EncoderSpec(
        "ResNet50", "caffe",
        {2: "conv1_relu", 4: "conv2_block3_out", 8: "conv3_block4_out", 16: "conv4_block6_out",
         32: "conv5_block3_out"},
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", WEIGHTS_URL + "resnet/",
        "4d473c1dd8becc155b73f8504c6f6626", dilatable=True),
    "resnet101": EncoderSpec(
        "ResNet101", "caffe",
        {2: "conv1_relu", 4: "conv2_block3_out", 8: "conv3_block4_out", 16: "conv4_block23_out",
         32: "conv5_block3_out"},
        "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5", WEIGHTS_URL + "resnet/",
        "88cf7a10940856eca736dc7b7e228a21", dilatable=True),
    "vgg16": EncoderSpec(
        "VGG16", "caffe",
        {2: "block2_conv2", 4: "block3_conv3", 8: "block4_conv3", 16: "block5_conv3", 32: "block5_pool"},
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", WEIGHTS_URL + "vgg16/",
        "6d6bbae143d832006294945121d1f1fc"),
    "efficientnetv2b0": EncoderSpec(
        "EfficientNetV2B0", "0-255",
        {2: "block1a_project_activation", 4: "block2b_add", 8: "block4a_expand_activation",
         16: "block6a_expand_activation", 32: "top_activation"},
        "efficientnetv2-b0_notop.h5", WEIGHTS_URL + "efficientnet_v2/", "893217f2bb855e2983157299931e43ff"),
    "efficientnetv2s": EncoderSpec(
        "EfficientNetV2S", "0-255",
        {2: "block1b_add", 4: "block2d_add", 8: "block4a_expand_activation", 16: "block6a_expand_activation",
         32: "top_activation"},
        "efficientnetv2-s_notop.h5", WEIGHTS_URL + "efficientnet_v2/", "af0682fb74e8c54910f2d4393339c070"),
    # Positions from the end of the application's layers: the expansions (ReLU, then hard-swish)
    # before each strided depthwise convolution, and the last 1x1 convolution's hard-swish.
    "mobilenetv3large": EncoderSpec(
        "MobileNetV3Large", "0-255",
        {2: -174, 4: -156, 8: -111, 16: -46, 32: -1},
        "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5", WEIGHTS_URL + "mobilenet_v3/",
        "07fb09a5933dd0c8eaafa16978110389", dilatable_on_request=True),
    # As the Large: the stem's activation, the expansions before the strided depthwise convolutions.
    "mobilenetv3small": EncoderSpec(
        "MobileNetV3Small", "0-255",
        {2: -153, 4: -138, 8: -120, 16: -46, 32: -1},
        "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5", WEIGHTS_URL + "mobilenet_v3/",
        "d3e8ec802a04aa4fc771ee12a9a9b836", dilatable_on_request=True),
    # The stages' last blocks; the stem has stride 4. (The application's final LayerNormalization,
    # after stage 3, is left out: decoders normalise on their own.)
    "convnext_tiny": EncoderSpec(
        "ConvNeXtTiny", "0-255",
        {2: None, 4: "convnext_tiny_stage_0_block_2_identity", 8: "convnext_tiny_stage_1_block_2_identity",
         16: "convnext_tiny_stage_2_block_8_identity", 32: "convnext_tiny_stage_3_block_2_identity"},
        "convnext_tiny_notop.h5", WEIGHTS_URL + "convnext/",
        "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1"),
}


def get_encoder(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    return ENCODERS[name]


def keras_models_dir() -> str:
    """Where `keras.utils.get_file(..., cache_subdir="models")` keeps downloads."""
    return os.path.join(os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras"), "models")


def resolve_weights(encoder: str, weights) -> Optional[str]:
    """`None` for random initialisation, else the local path of the weights file to load.

    "imagenet" downloads the application's include_top=False file once (or finds it in the
    cache); offline, the error says which file to fetch and where to put it.
    """
    spec = get_encoder(encoder)
    if weights is None or weights == "none":
        return None
    if weights == "imagenet":
        try:
            return keras.utils.get_file(spec.imagenet_file, spec.imagenet_url + spec.imagenet_file,
                                        cache_subdir="models", file_hash=spec.imagenet_hash)
        except Exception as err:  # get_file wraps every network failure in a bare Exception
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise EncoderWeightsError(
                f"encoder weights imagenet: could not download {spec.imagenet_file} for {spec.application} "
                f"({reason}); fetch {spec.imagenet_url + spec.imagenet_file} and put it in {keras_models_dir()}/, "
                "or give its path with --encoder-weights PATH") from None
    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise EncoderWeightsError(f"encoder weights {path}: no such file (expected {spec.application} "
                                  f"include_top=False weights, e.g. {spec.imagenet_file}; or imagenet, or none)")
    if not path.endswith(".h5"):
        raise EncoderWeightsError(f"encoder weights {path}: expected a .weights.h5 or legacy .h5 file of "
                                  f"{spec.application} (include_top=False)")
    return path


def load_encoder_weights(application: keras.Model, path: str, encoder: str):
    """Load `path` into the application's layers; a file that does not fit is a one-line error."""
    spec = get_encoder(encoder)
    import warnings

    try:
        with warnings.catch_warnings():
            # Keras warns for each group it cannot match before it raises; the error says it once.
            warnings.simplefilter("ignore")
            application.load_weights(path)
    except Exception as err:  # h5py (OSError), a count or shape mismatch (ValueError)
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise EncoderWeightsError(f"encoder weights {path}: not {spec.application} include_top=False weights "
                                  f"({first[:200]})") from None


def check_encoder_weights(encoder: str, weights):
    """Resolve and load `weights` into a small build of the encoder: refuses a wrong file early."""
    path = resolve_weights(encoder, weights)
    if path is not None:
        spec = get_encoder(encoder)
        application = getattr(keras.applications, spec.application)(include_top=False, weights=None,
                                                                     input_shape=(64, 64, 3))
        load_encoder_weights(application, path, encoder)
    return path


def preprocessing_layer(encoder: str):
    """The registered layer that turns [0, 1] RGB into what the encoder's ImageNet weights expect."""
    spec = get_encoder(encoder)
    if spec.preprocessing == "caffe":
        return CaffePreprocessing(name="caffe_preprocessing", dtype="float32")
    # EfficientNetV2, ConvNeXt and MobileNetV3 normalise inside (their include_preprocessing
    # layers), from 0-255 RGB: their preprocess_input is the identity.
    return ScaleTo255(name="scale_to_255", dtype="float32")


def _tapped(application, tap):
    if tap is None:
        return None
    if isinstance(tap, int):
        return application.layers[tap].output
    return application.get_layer(tap).output


def build_encoder(encoder: str, images, weights=None, output_stride: int = 32, bn_momentum=None):
    """The encoder's features at strides 2-32 in the caller's graph, from images in [0, 1] RGB.

    Args:
        encoder: str. A key of `ENCODERS`.
        images: the model's input tensor (a Keras tensor, 3 channels).
        weights: None / "none", "imagenet", or a local weights file (see the module docstring).
        output_stride: 32, or 16 for a dilatable encoder (ResNet): its last stage is rebuilt with
            stride 1 and dilation 2, under the same names and with the same weights.
        bn_momentum: None (as `keras.applications` builds the encoder) or the momentum of its
            batch norms' moving statistics. MobileNetV3's 0.999 keeps them near their initial
            values for the first thousands of steps: a short run from random weights then
            validates with statistics that fit nothing (0.99 is Keras' default).

    Returns:
        `(features, layer_names)`: a dict stride -> tensor (None where the encoder has no such
        stride; at output stride 16, key 32 holds the dilated last stage, still at stride 16),
        and the names of the encoder's layers in the graph (for freezing them).
    """
    spec = get_encoder(encoder)
    if output_stride not in (16, 32):
        raise ValueError(f"output_stride must be 16 or 32, got {output_stride}")
    if output_stride == 16 and not (spec.dilatable or spec.dilatable_on_request):
        raise ValueError(f"encoder {encoder}: output stride 16 needs a dilatable encoder "
                         f"({', '.join(k for k, s in ENCODERS.items() if s.dilatable or s.dilatable_on_request)})")
    if images.shape[-1] != 3:
        raise ValueError(f"encoder {encoder}: ImageNet encoders take 3-channel images, got {images.shape[-1]}")
    path = resolve_weights(encoder, weights)
    preprocessed = preprocessing_layer(encoder)(images)
    application = getattr(keras.applications, spec.application)(include_top=False, weights=None,
                                                                 input_tensor=preprocessed)
    if path is not None:
        load_encoder_weights(application, path, encoder)
    if bn_momentum is not None:
        for layer in application.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = float(bn_momentum)
    features = {stride: _tapped(application, spec.features[stride]) for stride in STRIDES}
    if output_stride == 16:
        features[32] = _dilated_last_stage(application, spec.features[16])
    own = {layer.name for layer in application.layers} - {images._keras_history.operation.name,
                                                          preprocessed._keras_history.operation.name}
    # The encoder's layers are those its deepest feature depends on (the final stage when dilated
    # is built here, under the application's names).
    deepest = keras.Model(images, features[32])
    names = [layer.name for layer in deepest.layers if layer.name in own]
    return features, names


def _dilated_last_stage(application, stride16_layer):
    """The application's layers after the stride-16 feature, rebuilt with stride 1 and dilation 2.

    Each layer is re-created from its own config (strides 2 -> 1; kernels larger than 1x1 dilated
    by 2) under the same name, wired as in the application, and given the application's weights:
    at even positions its output equals the undilated stage's (tests/test_encoders.py). An explicit
    ZeroPadding2D before a strided "valid" convolution (MobileNetV3) is dropped and the convolution
    pads "same"; weightless operations that are not layers (MobileNetV3's hard sigmoid) are re-applied.
    """
    start = (application.layers[stride16_layer] if isinstance(stride16_layer, int)
             else application.get_layer(stride16_layer))
    operations = application.operations
    after = operations[operations.index(start) + 1:]
    rebuilt = {id(start.output): start.output}
    output = start.output
    for operation in after:
        node = operation._inbound_nodes[0]
        args, kwargs = node.arguments.fill_in(rebuilt)
        if isinstance(operation, layers.ZeroPadding2D):
            output = args[0]
        elif not isinstance(operation, layers.Layer):
            output = operation(*args, **kwargs)
        else:
            config = operation.get_config()
            if isinstance(operation, (layers.Conv2D, layers.DepthwiseConv2D)):
                if tuple(config["strides"]) != (1, 1):
                    config["strides"] = (1, 1)
                if max(config["kernel_size"]) > 1:
                    config["dilation_rate"] = (2, 2)
                    config["padding"] = "same"
            clone = operation.__class__.from_config(config)
            output = clone(*args, **kwargs)
            clone.set_weights(operation.get_weights())
        for original, new in zip(keras.tree.flatten(node.output_tensors), keras.tree.flatten(output)):
            rebuilt[id(original)] = new
    return output
