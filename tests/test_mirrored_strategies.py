"""Several MirroredStrategy objects in one process (runs in a notebook or a sweep, and this test
session): each one's collective reductions must not clash with an earlier one's. TensorFlow numbers
every new strategy's collectives from the same start and keeps the first shapes it saw under those
numbers, so a plain second strategy aborts with "Shape mismatch in the collective instance 100"."""

import numpy as np
import tensorflow as tf

from keras_seg import distribute


def summed_ones(strategy, size):
    """Each replica contributes ones([size]); the all-reduce gives every replica 2 x ones."""
    @tf.function
    def run():
        return strategy.run(lambda: tf.distribute.get_replica_context().all_reduce("sum", tf.ones([size])))
    return [v.numpy() for v in strategy.experimental_local_results(run())]


def test_strategies_made_one_after_another_reduce_tensors_of_any_shape():
    for size in (2, 1000, 3):
        for value in summed_ones(distribute.mirrored_strategy(["/cpu:0", "/cpu:1"]), size):
            np.testing.assert_array_equal(value, np.full(size, 2.0))


def test_the_command_lines_mirrored_strategy_is_one_of_them():
    """`--strategy mirrored --devices 2` after another strategy of this process (the test above)."""
    strategy = distribute.choose_strategy("mirrored", devices=2)
    assert strategy.num_replicas_in_sync == 2
    for value in summed_ones(strategy, 7):
        np.testing.assert_array_equal(value, np.full(7, 2.0))
    for value in summed_ones(distribute.mirrored_strategy(["/cpu:0", "/cpu:1", "/cpu:2"]), 5):
        np.testing.assert_array_equal(value, np.full(5, 3.0))
