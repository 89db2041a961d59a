"""--resize-mode fit: training's `fit_example` and the "fit" inference contract size and place an image alike."""

import numpy as np
import pytest
import tensorflow as tf

from keras_seg import contract as contracts
from keras_seg.data import fit_example
from tests.contract_reference import reference_probabilities

BOX = (256, 512)
# (image height, width) -> content size and top-left offset in the 256x512 box, by hand:
# landscape 375x500: factor min(256/375, 512/500) = 0.6827 -> 256x341, left (512-341)//2 = 85;
# portrait 500x375: factor min(256/500, 512/375) = 0.512 -> 256x192, left (512-192)//2 = 160.
EXPECTED = {(375, 500): ((256, 341), (0, 85)), (500, 375): ((256, 192), (0, 160))}


def content_box(pixels):
    """(size, offset) of the non-black region of [H, W, 3]."""
    rows = np.flatnonzero(pixels.max(axis=(1, 2)) > 0)
    cols = np.flatnonzero(pixels.max(axis=(0, 2)) > 0)
    return (rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1), (rows[0], cols[0])


def model_inputs(contract, image):
    """What the model is given when the contract infers `image` (eager: the model_fn sees the tensors)."""
    seen = []

    def model_fn(x):
        seen.append(x.numpy())
        return tf.ones([tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2], 2]) / 2.0

    contracts.contract_probabilities(image[None], model_fn, contract, 2)
    return seen


@pytest.mark.parametrize("shape", sorted(EXPECTED))
@pytest.mark.parametrize("divisor", [None, 32])
def test_fit_contract_sizes_and_places_like_training(shape, divisor):
    image = np.full((*shape, 3), 255, np.uint8)
    fitted, mask = fit_example(tf.constant(image), tf.zeros(shape, tf.uint8), BOX)
    assert content_box(fitted.numpy()) == EXPECTED[shape]
    assert content_box(np.where(mask.numpy() != 255, 1, 0)[..., None]) == EXPECTED[shape]

    contract = contracts.for_training("fit", BOX, size_divisor=divisor)
    seen = model_inputs(contract, image)
    assert len(seen) == 1 and seen[0].shape == (1, *BOX, 3)  # one call on the training box
    assert content_box(seen[0][0]) == EXPECTED[shape]


def test_fit_contract_matches_reference_on_portrait():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (100, 60, 3), np.uint8)  # portrait, in a 32x64 landscape box
    weights = rng.normal(size=(3, 4)).astype(np.float32)

    def model_fn(x):  # depends on the pixel and on its column: a misplaced image changes the answer
        columns = np.arange(np.shape(x)[2], dtype=np.float32)[None, None, :, None] / 64.0
        return tf.nn.softmax(tf.einsum("nhwc,ck->nhwk", tf.cast(x, tf.float32), weights) + columns, axis=-1)

    contract = contracts.for_training("fit", (32, 64))
    got = contracts.contract_probabilities(image[None], model_fn, contract, 4, flip=True, scales=(0.75, 1.0))
    want = reference_probabilities(image, lambda x: model_fn(x).numpy(), "fit", (32, 64), (32, 64), flip=True,
                                   scales=(0.75, 1.0))
    np.testing.assert_allclose(got.numpy()[0], want, atol=1e-5)


def test_old_fit_run_configs_get_the_fit_rule():
    from keras_seg.inference import run_contract

    recorded = contracts.InferenceContract("keep_ratio", BOX, "whole", BOX).to_dict()
    assert run_contract({"resize_mode": "fit", "image_size": list(BOX), "inference": recorded}).resize == "fit"
    assert run_contract({"resize_mode": "scale_crop", "image_size": list(BOX),
                         "inference": recorded}).resize == "keep_ratio"
