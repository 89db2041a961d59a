"""Model builders and presets: shapes, float32 logits under both policies, clear errors, parameter counts."""

import keras
import numpy as np
import pytest

from keras_seg.models import PRESETS, build_fcn, build_model, build_unet, get_preset, list_presets

# 19 classes, 3-channel input; the README's table.
PRESET_PARAMS = {
    "unet_silu": 31_050_579,
    "unet_relu": 31_050_579,
    "unet_small": 1_948_195,
    "fcn8s": 134_353_017,
    "fcn_resnet50": 33_327_033,
    "deeplabv3plus_resnet50": 26_766_083,
    "unet_resnet50": 32_605_379,
    "unet_mobilenetv3": 5_346_627,
    # The real-time models' CPU presets: the same networks as ddrnet23_slim / lraspp_mobilenetv3_small
    # (whose trainable counts tests/test_realtime_models.py pins), with batch-norm statistics.
    "ddrnet23_slim_cpu": 5_715_763,
    "lraspp_mobilenetv3_small_cpu": 1_090_014,
}


@pytest.fixture(params=["float32", "mixed_float16"])
def policy(request):
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(request.param)
    yield request.param
    keras.mixed_precision.set_dtype_policy(previous)


def compute_dtypes(model):
    return {layer.compute_dtype for layer in model.layers if layer.weights}


@pytest.mark.parametrize("upsampling", ["transpose", "bilinear"])
def test_unet_shapes_and_float32_logits(policy, upsampling):
    model = build_unet(5, (32, 64, 3), depth=3, base_filters=4, activation="silu", dropout=0.1, upsampling=upsampling)
    logits = model(np.zeros((2, 32, 64, 3), np.float32), training=False)
    assert tuple(logits.shape) == (2, 32, 64, 5)
    assert logits.dtype == "float32" and model.outputs[0].dtype == "float32"
    assert model.get_layer("logits").compute_dtype == "float32"
    body = "float16" if policy == "mixed_float16" else "float32"
    assert model.get_layer("down1_conv1").compute_dtype == body


def test_unet_levels_and_filters():
    model = build_unet(3, (64, 64, 3), depth=4, base_filters=8, batch_norm=False)
    assert model.get_layer("bottleneck_conv2").output.shape == (None, 4, 4, 128)
    assert model.get_layer("up1_conv2").output.shape == (None, 64, 64, 8)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    assert model.get_layer("down1_relu1") is not None


def test_unet_stem_stride_runs_the_levels_at_half_size_and_upsamples_the_logits(policy):
    model = build_unet(4, (32, 64, 3), depth=2, base_filters=4, stem_stride=2)
    assert model.get_layer("stem_conv").output.shape == (None, 16, 32, 4)
    assert model.get_layer("bottleneck_conv2").output.shape == (None, 4, 8, 16)
    assert model.get_layer("logits").output.shape == (None, 16, 32, 4)
    images = np.random.default_rng(0).random((1, 32, 64, 3), dtype=np.float32)
    logits = model(images)
    assert tuple(logits.shape) == (1, 32, 64, 4) and logits.dtype == "float32"
    # bilinear 2x up-sampling of the half-size logits (Keras' half-pixel centres): an output pixel
    # centred on a low-resolution pixel's quarter mixes it 3:1 with its neighbour
    low = keras.Model(model.input, model.get_layer("logits").output)(images).numpy()
    np.testing.assert_allclose(logits[0, 5, 9], 0.5625 * low[0, 2, 4] + 0.1875 * low[0, 2, 5]
                               + 0.1875 * low[0, 3, 4] + 0.0625 * low[0, 3, 5], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not a positive multiple of 8"):
        build_unet(4, (36, 64, 3), depth=2, base_filters=4, stem_stride=2)
    with pytest.raises(ValueError, match="stem_stride must be 1, 2 or 4"):
        build_unet(4, (32, 64, 3), depth=2, stem_stride=3)


def test_unet_dynamic_size_and_mixed_precision_training_step(policy):
    model = build_unet(3, (None, None, 3), depth=2, base_filters=4)
    assert tuple(model(np.zeros((1, 24, 40, 3), np.float32)).shape) == (1, 24, 40, 3)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    logs = model.train_on_batch(np.ones((2, 16, 16, 3)), np.ones((2, 16, 16)), return_dict=True)
    assert np.isfinite(logs["loss"])


@pytest.mark.parametrize("height,width", [(100, 128), (128, 120), (0, 64)])
def test_unet_rejects_sizes_not_divisible_by_its_stride(height, width):
    with pytest.raises(ValueError, match=r"unet: input (height|width) \d+ is not a positive multiple of 16"):
        build_unet(3, (height, width, 3), depth=4)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"activation": "gelu"}, "unknown activation 'gelu'"),
        ({"upsampling": "nearest"}, "unknown upsampling 'nearest'"),
        ({"depth": 0}, "depth must be >= 1"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_unet_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_unet(3, (32, 32, 3), **kwargs)


@pytest.mark.parametrize("head", ["32s", "16s", "8s"])
def test_fcn_vgg16_heads(policy, head):
    model = build_fcn(4, (64, 96, 3), backbone="vgg16", head=head, fc_filters=8, fc_kernel=3)
    logits = model(np.zeros((1, 64, 96, 3), np.float32))
    assert tuple(logits.shape) == (1, 64, 96, 4) and logits.dtype == "float32"
    assert model.name == f"fcn{head}_vgg16"
    assert ("score_pool4" in {layer.name for layer in model.layers}) == (head != "32s")
    assert ("score_pool3" in {layer.name for layer in model.layers}) == (head == "8s")
    if policy == "mixed_float16":
        assert compute_dtypes(model) == {"float16", "float32"}


def test_fcn_resnet50(policy):
    model = build_fcn(3, (64, 64, 3), backbone="resnet50", head="8s", fc_filters=8, fc_kernel=3, dropout=0.0)
    logits = model(np.zeros((1, 64, 64, 3), np.float32))
    assert tuple(logits.shape) == (1, 64, 64, 3) and logits.dtype == "float32"


def test_fcn_loads_local_encoder_weights(tmp_path):
    encoder = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = str(tmp_path / "vgg16_notop.weights.h5")
    encoder.save_weights(path)
    model = build_fcn(2, (32, 32, 3), fc_filters=4, fc_kernel=1, encoder_weights=path)
    np.testing.assert_array_equal(
        model.get_layer("block5_conv3").get_weights()[0], encoder.get_layer("block5_conv3").get_weights()[0]
    )


@pytest.mark.parametrize("backbone, constructor, tapped", [
    ("vgg16", "VGG16", ("block3_pool", "block4_pool", "block5_pool")),
    ("resnet50", "ResNet50", ("conv3_block4_out", "conv4_block6_out", "conv5_block3_out")),
])
def test_fcn_encoder_sees_what_imagenet_weights_expect(backbone, constructor, tapped):
    """Images in [0, 1] RGB into the FCN give the encoder features that keras.applications' own model gives
    for `preprocess_input(255 * x)` (0-255 BGR minus the ImageNet means), with the same weights."""
    keras.utils.set_random_seed(0)
    model = build_fcn(3, (64, 64, 3), backbone=backbone, fc_filters=4, fc_kernel=1)
    reference = getattr(keras.applications, constructor)(include_top=False, weights=None, input_shape=(64, 64, 3))
    for layer in reference.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())  # the encoder keeps the layer names
    module = getattr(keras.applications, constructor.lower() if constructor == "VGG16" else "resnet")
    x = np.random.default_rng(1).random((2, 64, 64, 3)).astype("float32")
    ours = keras.Model(model.input, [model.get_layer(name).output for name in tapped])(x)
    theirs = keras.Model(reference.input, [reference.get_layer(name).output for name in tapped])(
        module.preprocess_input(255.0 * x))
    for name, a, b in zip(tapped, ours, theirs):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max(), err_msg=name)
    # and without the conversion (the earlier FCN), the features are far from it
    raw = keras.Model(reference.input, reference.get_layer(tapped[-1]).output)(x)
    assert np.abs(np.asarray(raw) - np.asarray(theirs[-1])).max() > 0.1 * np.abs(np.asarray(theirs[-1])).max()


def test_recorded_fcn_runs_without_preprocessing_are_rebuilt_as_trained():
    from keras_seg.models.presets import recorded_model_config

    old = {"architecture": "fcn", "backbone": "vgg16"}
    assert recorded_model_config(old)["preprocessing"] == "none"
    assert recorded_model_config({**old, "preprocessing": "caffe"})["preprocessing"] == "caffe"
    assert "preprocessing" not in recorded_model_config({"architecture": "unet"})
    assert get_preset("fcn8s")["model"]["preprocessing"] == "caffe"


def test_fcn_rejects_bad_arguments(tmp_path):
    missing = str(tmp_path / "missing.h5")
    with pytest.raises(ValueError, match="missing.h5: no such file"):
        build_fcn(3, (64, 64, 3), encoder_weights=missing)
    with pytest.raises(ValueError, match="unknown backbone 'resnet18'"):
        build_fcn(3, (64, 64, 3), backbone="resnet18")
    with pytest.raises(ValueError, match="unknown head '4s'"):
        build_fcn(3, (64, 64, 3), head="4s")
    with pytest.raises(ValueError, match="fcn: input width 48 is not a positive multiple of 32"):
        build_fcn(3, (64, 48, 3))


# --------------------------------------------------------------------------- presets


def test_list_and_get_presets():
    assert set(PRESET_PARAMS) <= set(list_presets())
    entry = get_preset("unet_small")
    assert set(entry) >= {"description", "model", "input_size"}
    entry["model"]["depth"] = 1
    assert PRESETS["unet_small"]["model"]["depth"] == 4  # a copy
    with pytest.raises(ValueError, match="unknown preset 'unet_big'; known presets: unet_silu, unet_relu"):
        get_preset("unet_big")


def test_required_preset_contents():
    silu = get_preset("unet_silu")
    assert silu["input_size"] == (256, 512)
    assert {k: silu["model"][k] for k in ("depth", "base_filters", "activation", "batch_norm", "upsampling")} == {
        "depth": 4,
        "base_filters": 64,
        "activation": "silu",
        "batch_norm": True,
        "upsampling": "transpose",
    }
    relu = get_preset("unet_relu")
    assert {**silu["model"], "activation": "relu"} == relu["model"]


# Presets of 20M parameters or more take most of the 14 s all of them took together on CPU-E: slow set.
@pytest.mark.parametrize("name", [name if expected < 20_000_000 else pytest.param(name, marks=pytest.mark.slow)
                                  for name, expected in PRESET_PARAMS.items()])
def test_preset_parameter_counts_and_input_sizes(name):
    model = build_model(name, num_classes=19)
    height, width = get_preset(name)["input_size"]
    assert model.name == name
    assert tuple(model.input_shape) == (None, height, width, 3), name
    assert tuple(model.output_shape) == (None, height, width, 19), name
    assert model.count_params() == PRESET_PARAMS[name], name
    keras.backend.clear_session()


def test_build_model_overrides_and_errors():
    entry = get_preset("unet_small")
    entry["model"]["base_filters"] = 2
    model = build_model(entry, num_classes=4, input_size=(None, None))
    assert tuple(model(np.zeros((1, 64, 32, 3), np.float32)).shape) == (1, 64, 32, 4)
    with pytest.raises(ValueError, match="unknown architecture 'segformer'"):
        build_model({"model": {"architecture": "segformer"}, "input_size": (64, 64)}, num_classes=3)
    with pytest.raises(ValueError, match="the unet architecture without an encoder has none to load"):
        build_model("unet_small", num_classes=3, encoder_weights="x.h5")
    with pytest.raises(ValueError, match="unet: input height 100"):
        build_model("unet_small", num_classes=3, input_size=(100, 256))
