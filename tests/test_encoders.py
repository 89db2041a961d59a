"""ImageNet encoders: the features keras.applications gives, exact weight loading from both file
formats, the dilated ResNet, the decoders' parameter counts by hand, and one-line weight errors."""

import h5py
import keras
import numpy as np
import pytest

from keras_seg.models import build_deeplabv3plus, build_encoder_unet, build_model, encoders
from keras_seg.models.encoders import ENCODERS, STRIDES, EncoderWeightsError, build_encoder

SIZE = 64
# encoder -> the keras.applications module whose preprocess_input the ImageNet weights expect
PREPROCESS_MODULE = {"resnet50": "resnet50", "resnet101": "resnet", "vgg16": "vgg16",
                     "efficientnetv2b0": "efficientnet_v2", "efficientnetv2s": "efficientnet_v2",
                     "mobilenetv3large": "mobilenet_v3", "mobilenetv3small": "mobilenet_v3",
                     "convnext_tiny": "convnext"}
# The README's test command runs one light encoder of each sweep; `-m slow` runs the rest (seven
# applications built three times each took minutes on an AVX2-only CPU).
LIGHT = "mobilenetv3large"


def light_first(names):
    return [name if name == LIGHT else pytest.param(name, marks=pytest.mark.slow) for name in names]


def reference_application(encoder, size=SIZE):
    """keras.applications' own model, as a user builds it (its preprocessing layers included)."""
    return getattr(keras.applications, ENCODERS[encoder].application)(include_top=False, weights=None,
                                                                       input_shape=(size, size, 3))


def write_legacy_h5(model, path):
    """The layout of the official `*_notop.h5` releases, written here with h5py: the root lists the
    layers with weights (`layer_names`), each group lists its weights (`weight_names`)."""
    weighted = [layer for layer in model.layers if layer.weights]
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [layer.name.encode() for layer in weighted]
        f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.2.4"
        for layer in weighted:
            group = f.create_group(layer.name)
            names = [f"{layer.name}/{w.name}:0" for w in layer.weights]
            group.attrs["weight_names"] = [n.encode() for n in names]
            for name, value in zip(names, layer.get_weights()):
                group.create_dataset(name, data=value)


def tapped_reference_layers(reference, encoder):
    taps = ENCODERS[encoder].features
    return {s: (reference.layers[t] if isinstance(t, int) else reference.get_layer(t))
            for s, t in taps.items() if t is not None}


def encoder_model(encoder, weights, size=SIZE, output_stride=32):
    images = keras.Input((size, size, 3))
    features, names = build_encoder(encoder, images, weights=weights, output_stride=output_stride)
    strides = [s for s in STRIDES if features[s] is not None]
    return keras.Model(images, [features[s] for s in strides]), strides, names


@pytest.mark.parametrize("encoder", light_first(ENCODERS))
def test_features_equal_keras_applications_and_both_file_formats_load_exactly(encoder, tmp_path):
    keras.utils.set_random_seed(0)
    reference = reference_application(encoder)
    keras_file, legacy_file = str(tmp_path / "enc.weights.h5"), str(tmp_path / "enc_notop.h5")
    reference.save_weights(keras_file)
    write_legacy_h5(reference, legacy_file)
    # the table taps the last layer at each stride (an independent walk over the output shapes)
    taps = tapped_reference_layers(reference, encoder)
    for stride, layer in taps.items():
        assert layer.output.shape[1:3] == (SIZE // stride, SIZE // stride), (stride, layer.name)
        later = [other for other in reference.layers[reference.layers.index(layer) + 1:]
                 if len(other.output.shape) == 4 and other.output.shape[1] == SIZE // stride]
        if not (encoder == "convnext_tiny" and stride == 32):  # its final LayerNormalization is left out
            assert not later, (stride, layer.name, [other.name for other in later])
    assert (ENCODERS[encoder].features[2] is None) == (encoder == "convnext_tiny")
    used = reference.layers[:reference.layers.index(taps[32]) + 1]  # all but ConvNeXt's final norm
    expected_weights = [w.numpy() for layer in used for w in layer.weights]

    for path in (keras_file, legacy_file):
        model, strides, names = encoder_model(encoder, path)
        loaded = {id(w) for layer in model.layers if layer.name in names for w in layer.weights}
        ours = [w.numpy() for layer in model.layers if layer.name in names for w in layer.weights]
        assert len(loaded) == len(expected_weights)
        for a, b in zip(sorted(ours, key=lambda a: (a.shape, a.sum())),
                        sorted(expected_weights, key=lambda a: (a.shape, a.sum()))):
            np.testing.assert_array_equal(a, b)  # exactly the file's values

    # images in [0, 1] into our encoder == keras.applications on preprocess_input(255 x)
    x = np.random.default_rng(1).random((2, SIZE, SIZE, 3)).astype("float32")
    module = getattr(keras.applications, PREPROCESS_MODULE[encoder])
    theirs = keras.Model(reference.input, [taps[s].output for s in strides])(module.preprocess_input(255.0 * x))
    for stride, a, b in zip(strides, model(x), theirs):
        a, b = np.asarray(a), np.asarray(b)
        # float32 through up to 100 layers with random weights: relative to the features' scale
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max(), err_msg=f"{encoder} stride {stride}")
    keras.backend.clear_session()


def test_mobilenetv3_two_builds_in_one_process_tap_the_same_layers(tmp_path):
    keras.utils.set_random_seed(0)
    path = str(tmp_path / "mnv3.weights.h5")
    reference_application("mobilenetv3large").save_weights(path)
    first, strides, first_names = encoder_model("mobilenetv3large", path)
    second, _, second_names = encoder_model("mobilenetv3large", path)
    assert first_names != second_names  # auto-named activations: names cannot identify the taps
    x = np.random.default_rng(2).random((1, SIZE, SIZE, 3)).astype("float32")
    for stride, a, b, tensor in zip(strides, first(x), second(x), first.outputs):
        assert tensor.shape[1] == SIZE // stride
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    channels = [int(t.shape[-1]) for t in first.outputs]
    assert channels == [64, 72, 240, 672, 960]  # the expansions before each strided depthwise conv; conv_1


@pytest.mark.parametrize("encoder, blocks", [("resnet50", 6)])
def test_dilated_resnet_gives_stride16_features_from_the_same_weights(encoder, blocks, tmp_path):
    keras.utils.set_random_seed(0)
    path = str(tmp_path / "r50.weights.h5")
    reference_application(encoder, 128).save_weights(path)
    plain, _, _ = encoder_model(encoder, path, size=128)
    dilated, _, names = encoder_model(encoder, path, size=128, output_stride=16)
    assert dilated.outputs[-1].shape[1:3] == (8, 8) and plain.outputs[-1].shape[1:3] == (4, 4)
    for name in ("conv5_block1_0_conv", "conv5_block1_1_conv", "conv5_block2_2_conv", "conv5_block3_3_bn"):
        assert name in names
        for a, b in zip(dilated.get_layer(name).get_weights(), plain.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    assert dilated.get_layer("conv5_block2_2_conv").dilation_rate == (2, 2)
    # The stride-2 1x1 convolutions subsample; the dilated 3x3 convolutions then read the same
    # neighbours, so at even positions the dilated stage computes the strided stage's values.
    x = np.random.default_rng(3).random((2, 128, 128, 3)).astype("float32")
    a, b = np.asarray(dilated(x)[-1]), np.asarray(plain(x)[-1])
    np.testing.assert_allclose(a[:, ::2, ::2], b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
    assert np.abs(a[:, 1::2, 1::2] - b).max() > 1e-2 * np.abs(b).max()  # the other positions are new


def smp_decoder_params(skip_channels, deepest, filters, classes):
    """Hand count of segmentation_models' UNet decoder: per block two 3x3 convs without bias (the
    first over up-sampled + skip channels) with batch norm (4 per channel); a 3x3 head with bias."""
    total, channels = 0, deepest
    for skip, f in zip(skip_channels, filters):
        total += 9 * (channels + skip) * f + 4 * f + 9 * f * f + 4 * f
        channels = f
    return total + 9 * channels * classes + classes


@pytest.mark.parametrize("encoder", ["resnet50", "mobilenetv3large", "convnext_tiny"])
def test_unet_decoder_skips_and_parameters(encoder):
    filters = (32, 16, 16, 8, 8)
    model = build_encoder_unet(5, (64, 96, 3), encoder=encoder, decoder_filters=filters)
    reference = reference_application(encoder)
    taps = tapped_reference_layers(reference, encoder)
    skips = [int(taps[s].output.shape[-1]) if s in taps else 0 for s in (16, 8, 4, 2)] + [0]
    encoder_params = reference.count_params()
    if encoder == "convnext_tiny":
        encoder_params -= 2 * 768  # the final LayerNormalization, left out
        assert "decoder_block4_concat" not in [layer.name for layer in model.layers]  # no stride-2 skip
    expected = encoder_params + smp_decoder_params(skips, int(taps[32].output.shape[-1]), filters, 5)
    assert model.count_params() == expected
    logits = model(np.zeros((1, 64, 96, 3), np.float32))
    assert tuple(logits.shape) == (1, 64, 96, 5) and logits.dtype == "float32"
    keras.backend.clear_session()


def test_deeplabv3plus_structure_aux_head_and_parameters():
    # the plain head (separable=False); the default, SMP's separable head: tests/test_deeplab_separable.py
    model = build_deeplabv3plus(4, (64, 64, 3), encoder="resnet50", aux_weight=0.4, with_aux=True, separable=False)
    logits, aux = model.outputs
    assert logits.shape[1:] == (64, 64, 4) and aux.shape[1:] == (64, 64, 4)
    assert model.get_layer("conv5_block3_out").output.shape[1:3] == (4, 4)  # output stride 16
    assert model.get_layer("aspp_rate12_conv").dilation_rate == (12, 12)
    assert model.get_layer("decoder_low_level_conv").input.shape[-1] == 256  # the stride-4 features
    assert model.get_layer("aux_head_conv").input.shape[-1] == 1024  # stride 16: conv4
    inference = build_deeplabv3plus(4, (64, 64, 3), encoder="resnet50", aux_weight=0.4, separable=False)
    assert len(inference.outputs) == 1
    encoder_params = keras.applications.ResNet50(include_top=False, weights=None).count_params()
    aspp = (2048 * 256 + 3 * 9 * 2048 * 256 + 2048 * 256) + 5 * 4 * 256 + (5 * 256 * 256 + 4 * 256)
    decoder = (256 * 48 + 4 * 48) + (9 * 304 * 256 + 4 * 256) + (9 * 256 * 256 + 4 * 256) + (256 * 4 + 4)
    assert inference.count_params() == encoder_params + aspp + decoder
    aux_head = 9 * 1024 * 256 + 4 * 256 + 256 * 4 + 4
    assert model.count_params() == inference.count_params() + aux_head
    # the other encoders run at output stride 32, where the rates halve
    light = build_deeplabv3plus(4, (64, 64, 3), encoder="mobilenetv3large")
    assert light.get_layer("aspp_rate6_conv").dilation_rate == (6, 6)
    assert light.get_layer("decoder_up").size == (8, 8)


def test_segmentation_model_keeps_keras_applications_names():
    model = build_model("unet_resnet50", 3, input_size=(64, 64))
    layer = model.get_layer("conv4_block6_out")
    assert layer in model.layers  # in the model's own graph, not a nested sub-model
    assert not any(isinstance(other, keras.Model) for other in model.layers)
    assert "conv4_block6_out" in model.encoder_layer_names and "logits" not in model.encoder_layer_names


# --------------------------------------------------------------------------- weights errors


def test_wrong_missing_and_misnamed_files_are_one_line_errors(tmp_path):
    vgg = str(tmp_path / "vgg16.weights.h5")
    keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(vgg)
    legacy = str(tmp_path / "vgg16_notop.h5")
    write_legacy_h5(keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)), legacy)
    for path in (vgg, legacy):
        with pytest.raises(EncoderWeightsError) as err:
            build_model("unet_resnet50", 3, input_size=(64, 64), encoder_weights=path)
        message = str(err.value)
        assert "\n" not in message and path in message and "not ResNet50 include_top=False weights" in message
    with pytest.raises(EncoderWeightsError, match="missing.h5: no such file \\(expected ResNet50"):
        encoders.resolve_weights("resnet50", str(tmp_path / "missing.h5"))
    text = tmp_path / "weights.npz"
    text.write_bytes(b"x")
    with pytest.raises(EncoderWeightsError, match="expected a .weights.h5 or legacy .h5 file of ResNet50"):
        encoders.resolve_weights("resnet50", str(text))
    with pytest.raises(ValueError, match="output stride 16 needs a dilatable encoder"):
        build_deeplabv3plus(3, (64, 64, 3), encoder="vgg16", output_stride=16)


def test_imagenet_asks_keras_for_the_notop_file_and_loads_it(tmp_path, monkeypatch):
    keras.utils.set_random_seed(0)
    local = str(tmp_path / "cached_notop.h5")
    reference = reference_application("mobilenetv3large")
    write_legacy_h5(reference, local)
    asked = []

    def fake_get_file(fname, origin, cache_subdir, file_hash):
        asked.append((fname, origin, cache_subdir, file_hash))
        return local

    monkeypatch.setattr(keras.utils, "get_file", fake_get_file)
    model = build_model("unet_mobilenetv3", 3, input_size=(64, 64), encoder_weights="imagenet")
    assert asked == [("weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
                      "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v3/"
                      "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5", "models",
                      "07fb09a5933dd0c8eaafa16978110389")]
    np.testing.assert_array_equal(model.get_layer("conv_1").get_weights()[0],
                                  reference.get_layer("conv_1").get_weights()[0])


@pytest.mark.parametrize("encoder, file", [(name, spec.imagenet_file) for name, spec in ENCODERS.items()])
def test_imagenet_offline_says_which_file_to_fetch_and_where(encoder, file, tmp_path, monkeypatch):
    def offline(fname, origin, cache_subdir, file_hash):
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    with pytest.raises(EncoderWeightsError) as err:
        encoders.resolve_weights(encoder, "imagenet")
    message = str(err.value)
    assert "\n" not in message
    assert "fetch https://storage.googleapis.com/tensorflow/keras-applications/" in message and file in message
    assert f"put it in {tmp_path / 'keras_home' / 'models'}/" in message


def test_encoder_bn_momentum_sets_the_moving_statistics_update():
    """MobileNetV3's batch norms keep 0.999 of their statistics; at 0.99 one training step on a
    batch moves the moving mean 1% of the way to the batch mean (from 0), and the saved config keeps it."""
    model = build_encoder_unet(3, (32, 32, 3), encoder="mobilenetv3large", encoder_bn_momentum=0.99,
                               decoder_filters=(8, 8, 8, 8, 8))
    default = build_encoder_unet(3, (32, 32, 3), encoder="mobilenetv3large", decoder_filters=(8, 8, 8, 8, 8))
    assert {layer.momentum for layer in default.layers if layer.name in default.encoder_layer_names
            and isinstance(layer, keras.layers.BatchNormalization)} == {0.999}
    first_bn = model.get_layer("conv_bn")
    assert first_bn.momentum == 0.99
    x = np.random.default_rng(0).random((2, 32, 32, 3)).astype("float32")
    conv_out = keras.Model(model.input, model.get_layer("conv").output)(x).numpy()
    model(x, training=True)
    np.testing.assert_allclose(first_bn.moving_mean.numpy(), 0.01 * conv_out.mean(axis=(0, 1, 2)), rtol=1e-4,
                               atol=1e-7)
    restored = keras.Model.from_config(model.get_config())
    assert restored.get_layer("conv_bn").momentum == 0.99
