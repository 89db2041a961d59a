"""A run's real compiled step on one fixed batch, without a dataset on disk: for the benchmarks and
profiles in tools/ and for tests that time or compare the step itself.

    step = fixed_batch_step(config, images, masks)    # config: a TrainConfig, e.g. from a preset
    loss = step()                                      # one optimizer step, as the trainer runs it

It is `setup.build_state` and `step.make_train_steps` as the trainer calls them, fed the batch
over and over through the strategy; the class pixel counts (for class weights) are the batch's.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from keras_seg import distribute
from keras_seg.labels import IGNORE_INDEX
from keras_seg.training import setup
from keras_seg.training.step import make_train_steps


def batch_info(masks, num_classes: int, examples: int = 1000) -> dict:
    """A dataset_info.json for a data set that looks like this batch (its class pixel counts)."""
    masks = np.asarray(masks)
    counts = np.bincount(masks[masks != IGNORE_INDEX].ravel(), minlength=num_classes)[:num_classes]
    return {"num_classes": num_classes, "class_names": [f"class{i}" for i in range(num_classes)],
            "class_colors": [[i, i, i] for i in range(num_classes)],
            "splits": {"train": {"num_examples": examples, "class_pixel_counts": counts.tolist()},
                       "val": {"num_examples": 100}}}


class FixedBatchStep:
    """`step(n=1)`: n of the run's optimizer steps on the batch; returns their mean loss (waits for it)."""

    def __init__(self, config, images, masks, num_classes: int, precision: str = "float32", strategy=None,
                 info=None):
        import keras

        keras.mixed_precision.set_dtype_policy(precision)
        self.strategy = strategy or distribute.choose_strategy("one")
        self.shape = setup.describe_run(config, self.strategy.num_replicas_in_sync,
                                        info=info or batch_info(masks, num_classes))
        self.state = setup.build_state(config, self.shape, self.strategy, precision,
                                       setup.fixed_total(config, self.shape) or 10**9, log=lambda *_: None)
        self.train_steps = make_train_steps(self.state, config, self.strategy, log=lambda *_: None)
        batch = (tf.constant(images, tf.float32), tf.constant(masks, tf.uint8))
        options = tf.data.Options()
        options.autotune.enabled = False  # nothing to tune; and its iterator deletes at once
        dataset = tf.data.Dataset.from_tensors(batch).repeat().with_options(options)
        self.iterator = iter(self.strategy.experimental_distribute_dataset(dataset))

    @property
    def model(self):
        return self.state.train_model

    def __call__(self, n: int = 1) -> float:
        return float(self.train_steps(self.iterator, tf.constant(n)))
