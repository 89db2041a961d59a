"""Validation and evaluate on images of many sizes (VOC at full resolution) trace their graph at most twice,
not once per size."""

import numpy as np
import pytest
import tensorflow as tf

from keras_seg import inference
from keras_seg.training.step import make_eval_step
from keras_seg.training.trainer import Trainer

from test_train import make_config, tiny_data  # noqa: F401 (fixture)

SIZES = [(48, 80), (64, 128), (72, 96), (40, 136), (56, 56), (80, 120)]


def _batches(sizes, per_batch=1):
    rng = np.random.default_rng(0)
    for height, width in sizes:
        images = rng.integers(0, 256, (per_batch, height, width, 3)).astype(np.float32) / 255.0
        masks = rng.integers(0, 19, (per_batch, height, width)).astype(np.int32)
        yield tf.constant(images), tf.constant(masks)


@pytest.mark.parametrize("replicas", [1, 2])
def test_validation_on_six_image_sizes_traces_at_most_twice(tiny_data, tmp_path, replicas):  # noqa: F811
    strategy = ["--strategy", "mirrored", "--devices", "2"] if replicas == 2 else []
    config = make_config(tiny_data, tmp_path / "run", "--iters", "1", "--no-export", *strategy)
    trainer = Trainer(config, log=lambda _: None)
    state = trainer.build()
    eval_step = make_eval_step(state, config, trainer.strategy, trainer.shape.num_classes)
    # As the trainer's validation stream: images of several sizes go one per replica.
    dataset = tf.data.Dataset.from_generator(
        lambda: _batches(SIZES, per_batch=replicas),
        output_signature=(tf.TensorSpec([None, None, None, 3], tf.float32),
                          tf.TensorSpec([None, None, None], tf.int32)))
    for batch in trainer.strategy.experimental_distribute_dataset(dataset):
        eval_step(batch)
    assert eval_step.experimental_get_tracing_count() <= 2
    # Every image was scored at its own size: the confusion matrix counts each pixel once.
    counted = float(np.sum(state.val_iou.counts.numpy()))
    assert counted == replicas * sum(h * w for h, w in SIZES)


def test_evaluate_scoring_on_six_image_sizes_traces_once(tiny_data, tmp_path):  # noqa: F811
    """evaluate's path (`Segmenter.probabilities` of a run) follows one traced contract for every size."""
    config = make_config(tiny_data, tmp_path / "run", "--iters", "1", "--no-export")
    trainer = Trainer(config, log=lambda _: None)
    state = trainer.build()
    info = {"num_classes": 19, "class_names": trainer.shape.class_names, "class_colors": [[0, 0, 0]] * 19,
            "inference": config.inference}
    segmenter = inference.segmenter_from_model(state.inference_model, info)
    for images, _ in _batches(SIZES):
        probabilities = segmenter.probabilities(np.rint(images.numpy() * 255).astype(np.uint8))
        assert probabilities.shape[1:3] == images.shape[1:3]
    assert segmenter.owner.probabilities.experimental_get_tracing_count() == 1
