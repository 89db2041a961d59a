"""FCN's Caffe preprocessing runs in float32 under a mixed policy (issue 20, item 14)."""

import keras
import numpy as np

from keras_seg.models.fcn import build_fcn
from keras_seg.models.preprocessing import IMAGENET_BGR_MEAN


def test_caffe_preprocessing_is_float32_under_mixed_bfloat16():
    """VGG16's input is 0-255 BGR minus the means, as keras.applications' preprocess_input computes it
    in float32 (numpy reference here); in bfloat16 (8-bit mantissa) values of 100-150 are off by up to 0.5."""
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_fcn(3, input_shape=(32, 32, 3), fc_filters=8, fc_kernel=1)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert any(layer.compute_dtype == "bfloat16" for layer in model.layers)  # the policy took effect
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.float32) / 255.0
    layer = model.get_layer("caffe_preprocessing")
    got = keras.ops.convert_to_numpy(layer(images)).astype(np.float64)
    want = images[..., ::-1].astype(np.float64) * 255.0 - np.array(IMAGENET_BGR_MEAN)
    np.testing.assert_allclose(got, want, atol=1e-3)
