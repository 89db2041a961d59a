"""Sliding-window inference adds each window into its own slice of the canvas (issue 20, item 14)."""

import numpy as np
import pytest
import tensorflow as tf

from keras_seg import contract as contracts
from tests.contract_reference import numpy_slide

WEIGHTS = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)


def model_fn(x):
    """Softmax depending on the pixel and on its place in the window: misplaced windows change the answer."""
    rows = tf.range(tf.shape(x)[1], dtype=tf.float32)[None, :, None, None] / 16.0
    columns = tf.range(tf.shape(x)[2], dtype=tf.float32)[None, None, :, None] / 32.0
    return tf.nn.softmax(tf.einsum("nhwc,ck->nhwk", tf.cast(x, tf.float32), WEIGHTS) + rows - columns, axis=-1)


@pytest.mark.parametrize("shape, centre", [((70, 150), False), ((20, 150), True), ((33, 40), True)])
def test_windows_equal_the_numpy_reference(shape, centre):
    images = np.random.default_rng(2).integers(0, 256, (2, *shape, 3), np.uint8)
    run = tf.function(lambda x: contracts.window_probabilities(x, model_fn, (32, 64), 1 / 3, 5, centre))
    got = run(tf.constant(images)).numpy()
    assert got.shape == (2, *shape, 5)
    for image, probabilities in zip(images, got):
        want = numpy_slide(image, lambda x: model_fn(x).numpy(), (32, 64), 1 / 3, centre)
        np.testing.assert_allclose(probabilities, want, atol=1e-5)


def test_no_window_is_padded_to_the_canvas():
    """The loop over windows holds no Pad: a window's softmax is not made canvas-sized before it is added
    (at ratio 1.75 of 1024x2048, 1792x3584, with 19 classes and a flipped pair: 0.98 GB per window)."""
    run = tf.function(lambda x: contracts.window_probabilities(x, model_fn, (32, 64), 1 / 3, 5),
                      input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
    library = run.get_concrete_function().graph.as_graph_def().library.function
    bodies = [f for f in library if "body" in f.signature.name]
    assert bodies, "the windows' loop was not found"
    ops = {node.op for body in bodies for node in body.node_def}
    assert not ops & {"Pad", "PadV2", "MirrorPad"}, sorted(ops)


def test_an_empty_batch_gives_no_probabilities():
    """A replica's share of a last, short batch can be empty (8 images, batch 4, 3 replicas): the
    scatter must not fail on it (it did, when the canvas had no image: found resuming a mirrored run)."""
    run = tf.function(lambda x: contracts.window_probabilities(x, model_fn, (32, 64), 1 / 3, 5))
    assert run(tf.zeros([0, 70, 150, 3], tf.uint8)).shape == (0, 70, 150, 5)
