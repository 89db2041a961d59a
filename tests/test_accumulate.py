"""--accumulate N: one optimizer step from N micro-batches is the step of one batch N times as large,
also for a loss normalised by what the whole batch holds (valid pixels, Dice's per-class sums)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seg import losses
from keras_seg.models.presets import build_model
from keras_seg.replicas import accumulation_totals, global_batch_loss
from keras_seg.training.step import make_train_steps
from keras_seg.training.trainer import Trainer

from test_train import make_config, tiny_data  # noqa: F401 (fixture)

CLASSES = 19


def _batch():
    """4 images; ignored pixels and classes that differ by micro-batch of 2 (class 7 only in the second)."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (4, 64, 128, 3)).astype(np.float32)
    masks = rng.integers(0, 5, (4, 64, 128)).astype(np.int32)
    masks[0, :48] = 255  # the first micro-batch is mostly ignored: few valid pixels
    masks[1, :, :100] = 255
    masks[2, 10:30, 20:90] = 7
    masks[3, 40:, 60:] = 7
    masks[3, :5] = 255
    return images, masks


def _one_step(data, output, batch, accumulate, images, masks):
    config = make_config(data, output, "--iters", "1", "--no-augment", "--batch-size", batch,
                         "--accumulate", accumulate, "--model-arg", "batch_norm=false", "--optimizer", "sgd",
                         "--learning-rate", "0.5", "--warmup-iters", "0", "--clipnorm", "0", "--loss", "ce+dice",
                         "--class-weights", ",".join(str(0.5 + 0.1 * c) for c in range(CLASSES)), "--no-export")
    trainer = Trainer(config, log=lambda _: None)
    state = trainer.build()
    train_steps = make_train_steps(state, config, trainer.strategy)
    # The trainer's global batch is examples_per_step (4) whatever the micro-batch.
    dataset = tf.data.Dataset.from_tensors((images, masks))
    iterator = iter(trainer.strategy.experimental_distribute_dataset(dataset))
    loss = float(train_steps(iterator, tf.constant(1)).numpy())
    return loss, trainer.model.get_weights()


@pytest.mark.parametrize("spec", ["ce", "focal", "ce+0.5*dice", "ohem"])
def test_micro_batch_gradients_with_step_totals_add_up_to_the_whole_batch(spec):
    """The building blocks alone (the light representative): a 1x1 convolution, two micro-batches.
    OHEM with min_kept 1 selects by its threshold alone, pixel by pixel, so micro-batches keep the
    pixels the whole batch keeps (its selection is per micro-batch otherwise: docs/training.md)."""
    images, masks = _batch()
    images, masks = images[:, ::8, ::8], masks[:, ::8, ::8]
    ohem = {"thresh": 0.055, "min_kept": 1}
    loss_fn = losses.build_loss(spec, class_weights=[0.5 + 0.1 * c for c in range(CLASSES)], ohem=ohem)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 16, 3)), keras.layers.Conv2D(CLASSES, 1)])
    if spec == "ohem":  # the threshold keeps some of the valid pixels, not all, nor none
        kept, valid = (float(v) for v in (loss_fn.statistics(masks, model(images))["count"], np.sum(masks != 255)))
        assert 0.2 * valid < kept < 0.8 * valid, (kept, valid)

    assert_micro_batches_add_up(loss_fn, model, images, masks, [slice(0, 2), slice(2, 4)], atol=1e-6)


def assert_micro_batches_add_up(loss_fn, model, images, masks, parts, atol):
    """The micro-batches' gradients at the step's totals (from a first pass over the parts, as the
    trainer takes them) add up to the whole batch's, and the step's loss is the whole batch's.
    Returns the whole batch's loss."""
    def gradient(x, y, totals=None):
        with tf.GradientTape() as tape:
            loss = global_batch_loss(loss_fn, y, model(x), totals)
        return loss, tape.gradient(loss, model.trainable_variables)

    whole_loss, whole = gradient(images, masks)
    if loss_fn.NEEDS_TOTALS:
        sums = [loss_fn.statistics(masks[p], model(images[p])) for p in parts]
        totals = accumulation_totals(loss_fn, masks, tf.nest.map_structure(tf.add, *sums))
    else:
        totals = accumulation_totals(loss_fn, masks)
    results = [gradient(images[p], masks[p], totals) for p in parts]
    for w, a, b in zip(whole, results[0][1], results[1][1]):
        np.testing.assert_allclose(a + b, w, rtol=1e-4, atol=atol)
    value = results[0][0] if loss_fn.NEEDS_TOTALS else results[0][0] + results[1][0]
    np.testing.assert_allclose(float(value), float(whole_loss), rtol=1e-5)
    return whole_loss


@pytest.mark.slow
def test_accumulated_ce_dice_step_equals_one_batch_with_weights_and_ignored_pixels(tiny_data, tmp_path):  # noqa: F811
    """No batch norm (its statistics are the micro-batch's by design); SGD, so the gradient's scale matters."""
    images, masks = _batch()
    initial = make_config(tiny_data, tmp_path / "x", "--iters", "1", "--model-arg", "batch_norm=false")
    keras.utils.set_random_seed(initial.seed)
    start = build_model({"model": initial.model, "input_size": (64, 128)}, CLASSES).get_weights()
    one_loss, one = _one_step(tiny_data, tmp_path / "one", "4", "1", images, masks)
    acc_loss, accumulated = _one_step(tiny_data, tmp_path / "acc", "2", "2", images, masks)
    moved = max(np.abs(a - b).max() for a, b in zip(start, one))
    assert moved > 1e-3  # the step changed the weights
    for a, b in zip(one, accumulated):
        # The update's error relative to the update itself.
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * moved)
    np.testing.assert_allclose(acc_loss, one_loss, rtol=1e-5)
