"""--tta on a "whole" contract feeds each scale at its own size (MMSegmentation's TTA), not padded to the input."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seg import contract as contracts
from keras_seg.config import validate
from keras_seg.models.layers import UpSample2D
from keras_seg.models.presets import build_model

from test_train import make_config, tiny_data  # noqa: F401 (fixture)

SCALE = (64, 128)


def pooling_model():
    """Logits that depend on the whole image's mean (global pooling, as DeepLabV3+'s image pooling)."""
    keras.utils.set_random_seed(0)
    images = keras.Input((None, None, 3))
    local = keras.layers.Conv2D(4, 3, padding="same")(images)
    pooled = keras.layers.GlobalAveragePooling2D(keepdims=True)(local)
    logits = keras.layers.Conv2D(3, 1)(keras.layers.Add()([local, 5.0 * pooled]))
    return keras.Model(images, logits)


def alone(model, image, size):
    """The model applied to the image rescaled to `size` alone, softmax resized back: computed here."""
    x = tf.image.resize(image, size, method="bilinear", antialias=True).numpy()
    x = np.clip(np.round(x), 0, 255).astype(np.float32) / 255.0
    probabilities = tf.nn.softmax(model(x[None], training=False)).numpy()[0]
    return tf.image.resize(probabilities, image.shape[:2], method="bilinear").numpy()


@pytest.mark.parametrize("resize", ["stretch", "keep_ratio"])
def test_tta_half_scale_is_the_model_on_the_rescaled_image_alone(resize):
    model = pooling_model()
    image = np.random.default_rng(0).integers(0, 256, (96, 192, 3), np.uint8)  # keep_ratio: 64x128 at 1.0
    contract = contracts.InferenceContract(resize, SCALE, "whole", SCALE, size_divisor=32)
    got = contracts.contract_probabilities(image[None], contracts.keras_model_fn(model), contract, 3, scales=(0.5,))
    want = alone(model, image, (32, 64))
    np.testing.assert_allclose(got.numpy()[0], want, atol=1e-5)
    # Padded to the 64x128 input (the contract without a size divisor), the pooling sees 75% black.
    padded = contracts.contract_probabilities(image[None], contracts.keras_model_fn(model),
                                              contracts.InferenceContract(resize, SCALE, "whole", SCALE), 3,
                                              scales=(0.5,))
    assert np.abs(padded.numpy()[0] - want).max() > 1e-2


def test_tta_pads_only_to_the_size_divisor():
    seen = []

    def model_fn(x):
        seen.append(tuple(x.shape[1:3]))
        return tf.ones([*x.shape[:3], 2]) / 2.0

    contract = contracts.InferenceContract("stretch", SCALE, "whole", SCALE, size_divisor=32)
    contracts.contract_probabilities(np.zeros((1, 50, 70, 3), np.uint8), model_fn, contract, 2,
                                     scales=(0.5, 0.75, 1.75))
    # 32x64; 48x96 -> 64x96; 112x224 -> 128x224: one call each, no windows.
    assert seen == [(32, 64), (64, 96), (128, 224)]



def test_training_config_records_the_divisor_for_whole_contracts(tiny_data, tmp_path):  # noqa: F811
    for resize_mode, divisor in (("resize", 16), ("fit", 16), ("crop", None)):  # 2^3 x stem 2
        config = validate(make_config(tiny_data, tmp_path / resize_mode, "--resize-mode", resize_mode))
        assert config.inference.get("size_divisor") == divisor
    ddrnet = make_config(tiny_data, tmp_path / "ddrnet")
    ddrnet.model = {"architecture": "ddrnet", "aux_weight": 0.4}
    ddrnet = validate(ddrnet)
    assert "size_divisor" not in ddrnet.inference  # DAPPM's pooling windows are fixed by the input size


def test_up_sample_equals_keras_and_runs_on_unknown_sizes_in_a_tf_function():
    x = np.random.default_rng(0).random((2, 5, 7, 3)).astype(np.float32)
    for interpolation in ("bilinear", "nearest"):
        want = keras.layers.UpSampling2D(4, interpolation=interpolation)(x).numpy()
        np.testing.assert_allclose(UpSample2D(4, interpolation)(x).numpy(), want, atol=1e-6)
    images = keras.Input((None, None, 3))
    model = keras.Model(images, UpSample2D(2)(images))
    run = tf.function(lambda t: model(t), reduce_retracing=True)
    assert run(tf.zeros((1, 8, 8, 3))).shape == (1, 16, 16, 3) and run(tf.zeros((1, 4, 6, 3))).shape == (1, 8, 12, 3)


# The ImageNet-sized builds take 6-7 s each on CPU-E: slow set; a plain and an encoder model stay.
PRESET_SIZES = [("unet_small", (64, 128)), ("lraspp_mobilenetv3_small", (64, 96))] + [
    pytest.param(preset, size, marks=pytest.mark.slow)
    for preset, size in [("deeplabv3plus_resnet50", (64, 96)), ("fcn8s", (64, 96)), ("unet_mobilenetv3", (64, 96))]]


@pytest.mark.parametrize("preset, size", PRESET_SIZES)
def test_any_size_copy_of_each_architecture_equals_the_fixed_size_model(preset, size):
    """The (None, None)-input model that whole contracts with a size divisor run (in a tf.function, as
    validation and the export do) gives the fixed-size model's logits at two sizes."""
    keras.utils.set_random_seed(1)
    any_size = build_model(preset, 5, input_size=(None, None), encoder_weights=None)
    run = tf.function(lambda t: any_size(t, training=False), reduce_retracing=True)
    for height, width in (size, (size[0] + 32, size[1] + 64)):
        fixed = build_model(preset, 5, input_size=(height, width), encoder_weights=None)
        fixed.set_weights(any_size.get_weights())
        x = np.random.default_rng(height).random((1, height, width, 3)).astype(np.float32)
        np.testing.assert_allclose(run(x).numpy(), fixed(x, training=False).numpy(), rtol=1e-4, atol=1e-4)
