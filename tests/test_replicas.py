"""keras_seg.replicas on 2 logical CPUs: one update from all replicas, checked against hand-computed
values and against one device."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seg import distribute, losses
from keras_seg.replicas import apply_global_gradients, global_batch_loss


@pytest.fixture(scope="module")
def strategy():
    # Strategies made by distribute.mirrored_strategy keep their collectives apart (tests/test_distribute.py).
    return distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])


def per_replica_values(strategy, variable):
    return [v.numpy() for v in strategy.experimental_local_results(variable)]


def test_clipping_uses_the_norm_of_the_summed_gradient(strategy):
    """Replica gradients [3, 0] and [0, 4] sum to [3, 4] (norm 5); clipped to norm 1: [0.6, 0.8].
    Clipping each replica's part first would give [1, 0] + [0, 1] = [1, 1]."""
    with strategy.scope():
        weights = keras.Variable([0.0, 0.0])
        optimizer = keras.optimizers.SGD(learning_rate=1.0)
        optimizer.build([weights])

    @tf.function
    def step():
        def replica_fn():
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            grad = tf.where(tf.equal(replica, 0), tf.constant([3.0, 0.0]), tf.constant([0.0, 4.0]))
            apply_global_gradients(optimizer, [grad], [weights], clipnorm=1.0)
        strategy.run(replica_fn)

    step()
    for values in per_replica_values(strategy, weights):
        np.testing.assert_allclose(values, [-0.6, -0.8], rtol=1e-6)


def test_an_overflow_on_one_replica_skips_the_step_on_all(strategy):
    """mixed_float16 loss scaling: an inf gradient on replica 1 only. The step is skipped everywhere,
    the loss scale halves, and the weights stay finite and equal on both replicas."""
    with strategy.scope():
        weights = keras.Variable([1.0, 1.0])
        optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(learning_rate=0.1))
        optimizer.build([weights])
    scale = float(optimizer.dynamic_scale.numpy())

    @tf.function
    def step(overflow):
        def replica_fn():
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            bad = tf.logical_and(overflow, tf.equal(replica, 1))
            grad = tf.where(bad, tf.constant([np.inf, 1.0]), tf.constant([1.0, 1.0])) * scale
            apply_global_gradients(optimizer, [grad], [weights], clipnorm=1.0)
        strategy.run(replica_fn)

    step(tf.constant(True))
    assert float(optimizer.dynamic_scale.numpy()) == scale / 2
    assert int(optimizer.iterations.numpy()) == 0
    for values in per_replica_values(strategy, weights):
        np.testing.assert_array_equal(values, [1.0, 1.0])
    step(tf.constant(False))  # a finite step is applied, once: the summed [2, 2] clipped to norm 1
    for values in per_replica_values(strategy, weights):
        np.testing.assert_allclose(values, [1.0 - 0.1 / np.sqrt(2)] * 2, rtol=1e-5)


def loss_and_gradient_on_replicas(strategy, loss_fn, masks, logits):
    """Image r on replica r: each replica's global-batch loss, and its gradient in its logits (in
    replica order)."""
    @tf.function
    def run():
        def replica_fn():
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            part = tf.gather(logits, [replica])
            with tf.GradientTape() as tape:
                tape.watch(part)
                value = global_batch_loss(loss_fn, tf.gather(masks, [replica]), part)
            return value, tape.gradient(value, part)
        return strategy.run(replica_fn)

    values, grads = run()
    values = [float(v) for v in strategy.experimental_local_results(values)]
    return values, np.concatenate([g.numpy() for g in strategy.experimental_local_results(grads)])


@pytest.mark.parametrize("spec", ["ce", "focal", "dice", "ce+dice"])
def test_the_loss_on_two_replicas_is_the_global_batch_loss(strategy, spec):
    """Two images split over two replicas, with very different valid-pixel counts: the loss and its
    summed gradients equal those of the whole batch on one device."""
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 3, size=(2, 8, 8)).astype(np.uint8)
    masks[0, :7] = 255  # image 0 keeps one row of valid pixels, image 1 all 64
    logits = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    loss_fn = losses.build_loss(spec, num_classes=3, class_weights=[1.0, 2.0, 0.5])

    variable = tf.Variable(logits)
    with tf.GradientTape() as tape:
        expected = loss_fn(masks, variable)
    expected_grad = tape.gradient(expected, variable).numpy()

    values, grads = loss_and_gradient_on_replicas(strategy, loss_fn, masks, logits)
    assert values[0] == pytest.approx(float(expected), rel=1e-5) and values[1] == pytest.approx(values[0], rel=1e-6)
    np.testing.assert_allclose(grads, expected_grad, rtol=1e-4, atol=1e-7)


def test_dice_of_two_one_class_images_is_taken_over_the_global_batch(strategy):
    """The issue's example: two images, each all one class (0 and 1), predicted at p = 0.9. Over the
    global batch each class's Dice is 2*0.9n / (n + n) = 0.9 (n pixels of the class, probability
    mass 0.9n + 0.1n on it): loss about 0.10. Per replica, each image's absent class scores ~0 and
    the mean is ~0.53."""
    masks = np.stack([np.zeros((4, 4), np.uint8), np.ones((4, 4), np.uint8)])
    probs = np.where(masks[..., None] == np.arange(2), 0.9, 0.1)
    logits = np.log(probs).astype(np.float32)
    dice = losses.DiceLoss(smooth=1e-6)

    @tf.function
    def on_replicas():
        def replica_fn():
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            return global_batch_loss(dice, tf.gather(masks, [replica]), tf.gather(logits, [replica]))
        return strategy.run(replica_fn)

    values = [float(v) for v in strategy.experimental_local_results(on_replicas())]
    # class c: intersection 0.9 * 16, cardinality (0.9 * 16 + 0.1 * 16) + 16 = 32 -> dice 0.9
    assert values == pytest.approx([0.1, 0.1], abs=1e-5)


def test_update_scales_multiply_the_adamw_update_on_every_replica(strategy):
    """AdamW (lr 0.1, weight decay 0.5) from weights 1 with the replicas' gradients summing to [1, 2]:
    decay 1 -> 0.95, then Adam's first step moves each weight by lr * g / |g| = 0.1: 0.85. Scaled by
    0.1 the update is -0.015 (0.985); scaled by 0 the weights stay exactly 1; None: as computed."""
    with strategy.scope():
        variables = [keras.Variable([1.0, 1.0]) for _ in range(3)]
        optimizer = keras.optimizers.AdamW(learning_rate=0.1, weight_decay=0.5, epsilon=1e-12)
        optimizer.build(variables)

    @tf.function
    def step():
        def replica_fn():
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            grad = tf.where(tf.equal(replica, 0), tf.constant([1.0, 0.0]), tf.constant([0.0, 2.0]))
            apply_global_gradients(optimizer, [grad] * 3, variables,
                                   update_scales=[None, tf.constant(0.1), tf.constant(0.0)])
        strategy.run(replica_fn)

    step()
    for expected, variable in zip(([0.85, 0.85], [0.985, 0.985], [1.0, 1.0]), variables):
        for values in per_replica_values(strategy, variable):
            np.testing.assert_allclose(values, expected, rtol=1e-6)
    for values in per_replica_values(strategy, variables[2]):
        np.testing.assert_array_equal(values, [1.0, 1.0])


def test_adam_after_a_freeze_moves_the_encoder_as_a_fresh_adam_would():
    """Adam (lr 0.1), gradient [1, -2] every step. A variable frozen for 3 steps (zero gradient,
    update scaled by 0) then takes, on its first unfrozen step, a fresh Adam's first step: each
    weight moves by lr * g / |g| = 0.1. Without the correction, Keras' step count (4) gives
    lr * sqrt(1 - 0.999^4) / (1 - 0.9^4) * (0.1 g) / sqrt(0.001 g^2) = 0.058 (and after long
    freezes more than 0.1: up to 6.5x)."""
    from keras_seg.finetune import adam_restart_correction

    variable = keras.Variable([0.0, 0.0])
    optimizer = keras.optimizers.Adam(learning_rate=0.1, epsilon=1e-12)
    optimizer.build([variable])
    grad = tf.constant([1.0, -2.0])
    for _ in range(3):  # frozen
        apply_global_gradients(optimizer, [tf.zeros_like(grad)], [variable], update_scales=[tf.constant(0.0)])
    np.testing.assert_array_equal(variable.numpy(), [0.0, 0.0])
    uncorrected = keras.Variable([0.0, 0.0])
    shadow = keras.optimizers.Adam(learning_rate=0.1, epsilon=1e-12)
    shadow.build([uncorrected])
    shadow.iterations.assign(3)
    shadow.apply([grad], [uncorrected])
    correction = adam_restart_correction(optimizer, 1)
    apply_global_gradients(optimizer, [grad], [variable], update_scales=[correction])
    np.testing.assert_allclose(variable.numpy(), [-0.1, 0.1], rtol=1e-5)
    expected_uncorrected = 0.1 * np.sqrt(1 - 0.999 ** 4) / (1 - 0.9 ** 4) * 0.1 / np.sqrt(0.001 * 1.0)
    np.testing.assert_allclose(-uncorrected.numpy()[0], expected_uncorrected, rtol=1e-4)


def test_freeze_then_adamw_through_the_trainers_update_scales():
    """finetune.encoder_update_scales as the trainer calls it, AdamW (lr 0.1, weight decay 0.5),
    --freeze-encoder 2, gradient [1, -2] on the "encoder" (a Dense kernel) and the "decoder" (a
    variable) from weights 1. Steps 0 and 1: the encoder stays exactly 1 (decay would move it).
    Step 2, its first: decay then a fresh Adam step, scaled by c = s(1) / s(3) with
    s(n) = sqrt(1 - 0.999^n) / (1 - 0.9^n): 1 - c * 0.1 * 0.5 * 1 - 0.1 * sign(g). The decoder
    meanwhile follows plain AdamW."""
    from types import SimpleNamespace

    from keras_seg.finetune import encoder_update_scales

    encoder = keras.layers.Dense(2, use_bias=False, kernel_initializer="ones")
    encoder.build((None, 1))
    decoder = keras.Variable([1.0, 1.0])
    variables = [encoder.kernel, decoder]
    optimizer = keras.optimizers.AdamW(learning_rate=0.1, weight_decay=0.5, epsilon=1e-12)
    optimizer.build(variables)
    config = SimpleNamespace(freeze_encoder=2, encoder_lr_mult=1.0, optimizer="adamw")
    step = tf.Variable(0, dtype=tf.int64)
    grad = tf.constant([1.0, -2.0])

    @tf.function
    def train_step():
        scales, kept = encoder_update_scales([encoder], variables, config, step, optimizer)
        grads = [tf.reshape(grad, (1, 2)), grad]
        grads = [g if s is None else tf.where(s == 0.0, tf.zeros_like(g), g) for g, s in zip(grads, scales)]
        apply_global_gradients(optimizer, grads, variables, update_scales=scales)
        step.assign_add(1)

    reference = keras.Variable([1.0, 1.0])
    plain = keras.optimizers.AdamW(learning_rate=0.1, weight_decay=0.5, epsilon=1e-12)
    plain.build([reference])
    for _ in range(2):
        train_step()
        plain.apply([grad], [reference])
        np.testing.assert_array_equal(encoder.kernel.numpy(), [[1.0, 1.0]])
    np.testing.assert_allclose(decoder.numpy(), reference.numpy(), rtol=1e-6)
    train_step()

    def s(n):
        return np.sqrt(1 - 0.999 ** n) / (1 - 0.9 ** n)

    c = s(1) / s(3)
    np.testing.assert_allclose(encoder.kernel.numpy()[0], [1 - c * 0.05 - 0.1, 1 - c * 0.05 + 0.1], rtol=1e-5)
