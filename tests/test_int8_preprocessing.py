"""int8 LiteRT of models whose input goes to an ImageNet encoder's preprocessing.

TFLite's int8 quantizer gave the [0, 1] tensor between the deployment model's division by 255 and
the encoder's multiplication by 255 the scale of the 0-255 product, one step per unit: the image
went through as black and white; and Caffe's channel flip (REVERSE_V2) an output scale other than its
input's, which the op does not apply. The reference here is the float Keras model on the same pixels.
"""

import numpy as np
import pytest
import tensorflow as tf

import keras
from keras_seg import export
from keras_seg.models.preprocessing import CaffePreprocessing, ScaleTo255


def small_model(preprocessing):
    """[0, 1] RGB -> 4 channels through an encoder-like start: MobileNetV3's own rescaling to [-1, 1]
    after ScaleTo255 (as keras.applications builds it), or the Caffe means."""
    images = keras.Input((32, 32, 3))
    x = preprocessing(dtype="float32")(images)
    if preprocessing is ScaleTo255:
        x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", kernel_initializer=keras.initializers.
                            GlorotUniform(seed=1))(x)
    logits = keras.layers.Conv2D(4, 1, kernel_initializer=keras.initializers.GlorotUniform(seed=2))(x)
    return keras.Model(images, logits)


def smooth_pixels(rng, count):
    """Images with the gradients and edges of photographs rather than noise: blurred random blocks."""
    blocks = rng.uniform(0, 255, (count, 8, 8, 3)).astype(np.float32)
    return np.clip(tf.image.resize(blocks, (32, 32), method="bicubic").numpy(), 0, 255).round()


def int8_logits(deploy, calibration, pixels):
    from ai_edge_litert.interpreter import Interpreter

    converter = tf.lite.TFLiteConverter.from_keras_model(deploy)
    for key, value in export.litert_options("int8", list(calibration)).items():
        if key == "target_spec":
            converter.target_spec.supported_ops = value["supported_ops"]
        else:
            setattr(converter, key, value)
    interpreter = Interpreter(model_content=export.quantize_calibrated(converter.convert()))  # as export does
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    results = []
    for image in pixels:
        interpreter.set_tensor(inp["index"], image[None].astype(np.uint8))
        interpreter.invoke()
        scale, zero = out["quantization"]
        results.append((interpreter.get_tensor(out["index"]).astype(np.float32) - zero) * scale)
    return np.concatenate(results)


# The converter warns of a uint8 input without fixed statistics: the representative data sets them.
@pytest.mark.filterwarnings("ignore:Statistics for quantized inputs:UserWarning")
@pytest.mark.parametrize("preprocessing", [ScaleTo255, CaffePreprocessing])
def test_int8_keeps_the_pixels_an_encoders_preprocessing_reads(preprocessing):
    rng = np.random.default_rng(0)
    model = small_model(preprocessing)
    deploy = export.deployment_model(model, (32, 32))
    calibration, held_out = smooth_pixels(rng, 32), smooth_pixels(rng, 8)
    expected = model(held_out / 255.0).numpy()
    np.testing.assert_allclose(deploy(held_out).numpy(), expected, rtol=1e-5, atol=1e-4)  # float: the same model
    error = int8_logits(deploy, calibration, held_out) - expected
    # int8 steps of the logits are about 1/256 of their range; a black-and-white input is off by a third
    assert np.sqrt(np.mean(error ** 2)) < 0.03 * np.std(expected), (np.sqrt(np.mean(error ** 2)), np.std(expected))


def test_caffe_preprocessing_from_pixels_equals_the_layer_on_unit_range():
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)
    images = keras.Input((4, 4, 3))
    from_pixels = keras.Model(images, export.caffe_from_pixels(images))(pixels).numpy()
    np.testing.assert_allclose(from_pixels, CaffePreprocessing()(pixels / 255.0).numpy(), atol=1e-3)
    np.testing.assert_allclose(from_pixels[..., 0], pixels[..., 2] - 103.939, atol=1e-3)  # B first, minus its mean


@pytest.mark.parametrize("preset", ["lraspp_mobilenetv3_small", "fcn8s"])
def test_presets_with_an_encoder_feed_it_pixels_and_keep_their_float_logits(preset):
    from keras_seg.models.presets import build_model

    model = build_model(preset, 5, input_size=(64, 64))
    deploy = export.deployment_model(model, (64, 64))
    # no [0, 1] tensor left for the quantizer: the wrapper divides nothing by 255
    assert not any(isinstance(layer, keras.layers.Rescaling) and layer.name == "to_unit_range"
                   for layer in deploy.layers)
    pixels = np.random.default_rng(2).uniform(0, 255, (1, 64, 64, 3)).astype(np.float32)
    expected = model(pixels / 255.0).numpy()
    np.testing.assert_allclose(deploy(pixels).numpy(), expected, atol=1e-4 * max(1.0, np.abs(expected).max()))
