"""The real-time models' compute against the published figures (issue 22), counted by TensorFlow's
profiler (keras_seg.models.flops: multiply-accumulates, as the papers and torchvision count)."""

import pytest

from keras_seg.models.flops import forward_flops, multiply_accumulates
from keras_seg.models.presets import build_model


def test_a_convolution_counts_two_flops_per_multiply_accumulate():
    """A hand-computed case: a 3x3 convolution, 3 -> 8 channels, 'same', no bias, on 16x16:
    16 x 16 x 8 outputs x 27 multiply-accumulates = 55,296."""
    import keras

    inputs = keras.Input((16, 16, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs))
    assert multiply_accumulates(model, (16, 16)) == 16 * 16 * 8 * 27
    assert forward_flops(model, (16, 16)) == 2 * 16 * 16 * 8 * 27


def test_lraspp_mobilenetv3_large_matches_torchvision():
    """torchvision: 2.086 G at 520x520, 21 classes. Our input must be a multiple of 32: 512x512,
    where the count scales by the area, (512/520)^2 -> 2.022 G; within 5%. (Measured: 2.03 G.)"""
    model = build_model("lraspp_mobilenetv3_large", 21, input_size=(512, 512))
    assert multiply_accumulates(model, (512, 512)) / 1e9 == pytest.approx(2.086 * (512 / 520) ** 2, rel=0.05)


def test_ddrnet23_slim_matches_the_paper_at_full_resolution():
    """DDRNet-23-slim: 36.3 G at 1024x2048 (Hong et al.), without the auxiliary head; within 5%.
    (Measured: 36.40 G.)"""
    model = build_model("ddrnet23_slim", 19, input_size=(1024, 2048))
    assert multiply_accumulates(model, (1024, 2048)) / 1e9 == pytest.approx(36.3, rel=0.05)
