"""Losses against numpy references written here, on hand-made masks with ignored pixels."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seg import distribute
from keras_seg.losses import (
    CombinedLoss,
    CrossEntropyLoss,
    DiceLoss,
    FocalLoss,
    build_loss,
    compute_class_weights,
    parse_loss_spec,
)

IGNORE = 255


# --------------------------------------------------------------------------- numpy references


def np_log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_cross_entropy(labels, logits, weights=None, gamma=None):
    """Mean over valid pixels of -w[y] (1 - p_y)^gamma log p_y, by explicit loops."""
    labels = np.asarray(labels).reshape(-1)
    log_probs = np_log_softmax(logits).reshape(labels.size, -1)
    total, count = 0.0, 0
    for y, lp in zip(labels, log_probs):
        if y == IGNORE:
            continue
        term = -lp[y]
        if gamma is not None:
            term *= (1.0 - math.exp(lp[y])) ** gamma
        if weights is not None:
            term *= weights[y]
        total += term
        count += 1
    return total / count if count else 0.0


def np_dice_loss(labels, logits, smooth=1.0, weights=None):
    labels = np.asarray(labels).reshape(-1)
    probs = np.exp(np_log_softmax(logits)).reshape(labels.size, -1)
    num_classes = probs.shape[1]
    dice = []
    for c in range(num_classes):
        inter = sum(p[c] for y, p in zip(labels, probs) if y == c)
        p_sum = sum(p[c] for y, p in zip(labels, probs) if y != IGNORE)
        t_sum = sum(1 for y in labels if y == c)
        dice.append((2 * inter + smooth) / (p_sum + t_sum + smooth))
    weights = np.ones(num_classes) if weights is None else np.asarray(weights, np.float64)
    return 1.0 - float((weights * np.array(dice)).sum() / weights.sum())


# --------------------------------------------------------------------------- hand-made cases


@pytest.fixture
def case():
    """3 classes, 2 images of 2x3 pixels, with ignored pixels; class 2 appears once."""
    labels = np.array([[[0, 1, IGNORE], [1, 1, 0]], [[2, IGNORE, 0], [1, 0, IGNORE]]], np.uint8)
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=2.0, size=(2, 2, 3, 3)).astype(np.float32)
    return labels, logits


def one_hot_logits(labels, num_classes, scale, wrong=False):
    """Logits that put `scale` on the true class (or on the next class when `wrong`)."""
    target = np.where(labels == IGNORE, 0, labels).astype(np.int64)
    if wrong:
        target = (target + 1) % num_classes
    return (np.eye(num_classes)[target] * scale).astype(np.float32)


def test_cross_entropy_matches_reference(case):
    labels, logits = case
    assert float(CrossEntropyLoss()(labels, logits)) == pytest.approx(np_cross_entropy(labels, logits), rel=1e-5)


def test_weighted_cross_entropy_is_normalized_by_valid_pixels(case):
    labels, logits = case
    weights = [0.5, 2.0, 4.0]
    got = float(CrossEntropyLoss(class_weights=weights)(labels, logits))
    assert got == pytest.approx(np_cross_entropy(labels, logits, weights), rel=1e-5)


def test_losses_accept_float_and_channel_masks(case):
    labels, logits = case
    expected = np_cross_entropy(labels, logits)
    assert float(CrossEntropyLoss()(labels[..., None].astype(np.float32), logits)) == pytest.approx(expected, rel=1e-5)
    assert float(CrossEntropyLoss()(labels.astype(np.int32), logits)) == pytest.approx(expected, rel=1e-5)


def test_ignored_pixels_do_not_matter(case):
    labels, logits = case
    changed = logits.copy()
    changed[labels == IGNORE] = 1000.0
    for loss in (CrossEntropyLoss(), FocalLoss(), DiceLoss()):
        assert float(loss(labels, changed)) == pytest.approx(float(loss(labels, logits)), rel=1e-5), loss.name


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_matches_reference(case, gamma):
    labels, logits = case
    weights = [1.0, 0.25, 3.0]
    got = float(FocalLoss(gamma=gamma, class_weights=weights)(labels, logits))
    assert got == pytest.approx(np_cross_entropy(labels, logits, weights, gamma=gamma), rel=1e-5)


def test_focal_with_gamma_0_is_cross_entropy(case):
    labels, logits = case
    assert float(FocalLoss(gamma=0.0)(labels, logits)) == pytest.approx(float(CrossEntropyLoss()(labels, logits)))


@pytest.mark.parametrize("smooth,weights", [(1.0, None), (0.01, None), (1.0, [1.0, 2.0, 0.5])])
def test_dice_matches_reference(case, smooth, weights):
    labels, logits = case
    got = float(DiceLoss(smooth=smooth, class_weights=weights)(labels, logits))
    assert got == pytest.approx(np_dice_loss(labels, logits, smooth, weights), rel=1e-5)


def test_perfect_and_all_wrong_predictions(case):
    labels, _ = case
    perfect = one_hot_logits(labels, 3, 50.0)
    wrong = one_hot_logits(labels, 3, 50.0, wrong=True)
    assert float(CrossEntropyLoss()(labels, perfect)) == pytest.approx(0.0, abs=1e-6)
    assert float(CrossEntropyLoss()(labels, wrong)) == pytest.approx(50.0, rel=1e-5)
    assert float(FocalLoss()(labels, perfect)) == pytest.approx(0.0, abs=1e-6)
    assert float(FocalLoss()(labels, wrong)) == pytest.approx(50.0, rel=1e-5)
    assert float(DiceLoss(smooth=1e-6)(labels, perfect)) == pytest.approx(0.0, abs=1e-5)
    assert float(DiceLoss(smooth=1e-6)(labels, wrong)) == pytest.approx(1.0, abs=1e-5)
    assert float(DiceLoss()(labels, wrong)) == pytest.approx(np_dice_loss(labels, wrong), rel=1e-5)


def test_all_ignored_batch_gives_zero_loss_and_gradient(case):
    _, logits = case
    labels = np.full(logits.shape[:-1], IGNORE, np.uint8)
    variable = tf.Variable(logits)
    for loss in (CrossEntropyLoss(class_weights=[1, 2, 3]), FocalLoss(), DiceLoss(), build_loss("ce+dice")):
        with tf.GradientTape() as tape:
            value = loss(labels, variable)
        gradient = tape.gradient(value, variable)
        assert float(value) == 0.0, loss.name
        assert np.all(gradient.numpy() == 0.0), loss.name


def test_empty_class_in_dice(case):
    labels, logits = case
    four_class_logits = np.concatenate([logits, np.full(logits.shape[:-1] + (1,), -2.0, np.float32)], -1)
    got = float(DiceLoss()(labels, four_class_logits))
    assert got == pytest.approx(np_dice_loss(labels, four_class_logits), rel=1e-5)


def test_build_loss_specs(case):
    labels, logits = case
    assert isinstance(build_loss("ce"), CrossEntropyLoss)
    assert isinstance(build_loss("focal", focal={"gamma": 1.0}), FocalLoss)
    combined = build_loss("ce + 0.5*dice", class_weights=[1.0, 2.0, 3.0], dice={"smooth": 0.5})
    assert isinstance(combined, CombinedLoss)
    expected = np_cross_entropy(labels, logits, [1.0, 2.0, 3.0]) + 0.5 * np_dice_loss(
        labels, logits, 0.5, [1.0, 2.0, 3.0]
    )
    assert float(combined(labels, logits)) == pytest.approx(expected, rel=1e-5)
    assert float(build_loss("2*ce")(labels, logits)) == pytest.approx(2 * np_cross_entropy(labels, logits), rel=1e-5)


@pytest.mark.parametrize("spec", ["", "ce+", "tversky", "ce*2", "ce+-1*dice"])
def test_build_loss_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match="bad loss term"):
        parse_loss_spec(spec)
    with pytest.raises(ValueError, match="bad loss term"):
        build_loss(spec)


def test_parse_loss_spec():
    assert parse_loss_spec("ce") == [(1.0, "ce")]
    assert parse_loss_spec("CE + 0.5*dice+.25 * focal") == [(1.0, "ce"), (0.5, "dice"), (0.25, "focal")]


def test_build_loss_with_class_weights_from_counts(case):
    labels, logits = case
    counts = [30, 10, 60]  # median-frequency weights 1, 3, 0.5
    loss = build_loss("ce", class_weights="median", class_pixel_counts=counts, num_classes=3)
    assert float(loss(labels, logits)) == pytest.approx(np_cross_entropy(labels, logits, [1.0, 3.0, 0.5]), rel=1e-5)
    info = {"num_classes": 3, "splits": {"train": {"class_pixel_counts": counts}}}
    loss = build_loss("ce", class_weights="median_frequency", class_pixel_counts=info)
    assert float(loss(labels, logits)) == pytest.approx(np_cross_entropy(labels, logits, [1.0, 3.0, 0.5]), rel=1e-5)
    assert build_loss("ce", class_weights="none").class_weights is None
    with pytest.raises(ValueError, match="needs the training split's class pixel counts"):
        build_loss("ce", class_weights="enet")
    with pytest.raises(ValueError, match="unknown class weighting 'sqrt'"):
        build_loss("ce", class_weights="sqrt", class_pixel_counts=counts)
    with pytest.raises(ValueError, match="2 class weights for 3 classes"):
        build_loss("ce", class_weights=[1.0, 2.0], num_classes=3)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown loss options"):
        build_loss("ce", dic={"smooth": 1})
    with pytest.raises(ValueError, match="smooth"):
        DiceLoss(smooth=0.0)
    with pytest.raises(ValueError, match="gamma"):
        FocalLoss(gamma=-1.0)
    with pytest.raises(ValueError, match="class_weights"):
        CrossEntropyLoss(class_weights=[1.0, -1.0])


@pytest.mark.parametrize("loss", [CrossEntropyLoss(), FocalLoss(gamma=0.5), DiceLoss(), build_loss("ce+dice")])
def test_extreme_float16_logits_give_finite_values_and_gradients(loss):
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        labels = np.array([[[0, 1], [2, IGNORE]]], np.uint8)
        logits = np.array([[[[6e4, -6e4, 0], [6e4, -6e4, 6e4]], [[-6e4, 6e4, -6e4], [6e4, 0, -6e4]]]], np.float16)
        variable = tf.Variable(logits)
        with tf.GradientTape() as tape:
            value = loss(labels, variable)
        gradient = tape.gradient(value, variable)
    finally:
        keras.mixed_precision.set_dtype_policy(previous)
    assert value.dtype == tf.float32
    assert np.isfinite(value.numpy()) and value.numpy() > 0
    assert gradient.dtype == tf.float16
    assert np.isfinite(gradient.numpy()).all()


def test_losses_are_scaled_for_tf_distribute(case):
    """Keras' path (`model.fit` under tf.distribute): each replica's value is its own part's loss
    divided by the replica count, so their sum is the mean of the per-replica losses. The trainer
    takes the global-batch loss instead (tests/test_replicas.py)."""
    labels, logits = case
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((labels, logits)).batch(2))
    (batch,) = list(dataset)
    for loss in (CrossEntropyLoss(), DiceLoss(), build_loss("ce+0.5*dice")):
        per_replica = strategy.run(tf.function(loss.__call__), args=batch)
        total = float(strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))
        expected = np.mean([float(loss(labels[i : i + 1], logits[i : i + 1])) for i in range(2)])
        assert total == pytest.approx(expected, rel=1e-5), loss.name


def test_losses_train_a_model_and_round_trip_through_config():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
    masks = rng.integers(0, 3, (4, 8, 8)).astype(np.uint8)
    masks[:, 0] = IGNORE
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(3, 1)])
    loss = build_loss("ce+0.5*dice", class_weights=[1.0, 2.0, 1.0])
    model.compile(optimizer="sgd", loss=loss)
    history = model.fit(images, masks, epochs=1, batch_size=2, verbose=0)
    assert np.isfinite(history.history["loss"][0])

    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    logits = model.predict(images, verbose=0)
    assert float(restored(masks, logits)) == pytest.approx(float(loss(masks, logits)), rel=1e-6)
    for single in (CrossEntropyLoss(class_weights=[1, 2, 3]), FocalLoss(gamma=1.5), DiceLoss(smooth=0.5)):
        clone = keras.losses.deserialize(keras.losses.serialize(single))
        assert float(clone(masks, logits)) == pytest.approx(float(single(masks, logits)), rel=1e-6)


# --------------------------------------------------------------------------- class weights


def test_class_weights_from_counts():
    counts = [10, 20, 0, 70]
    np.testing.assert_allclose(
        compute_class_weights(counts, "inverse_frequency"), [100 / 40, 100 / 80, 0, 100 / 280], rtol=1e-6
    )
    # frequencies 0.1, 0.2, 0.7 over the present classes: median 0.2
    np.testing.assert_allclose(compute_class_weights(counts, "median_frequency"), [2.0, 1.0, 0, 0.2 / 0.7], rtol=1e-6)
    expected_enet = [1 / math.log(1.02 + 0.1), 1 / math.log(1.02 + 0.2), 0, 1 / math.log(1.02 + 0.7)]
    np.testing.assert_allclose(compute_class_weights(counts, "enet"), expected_enet, rtol=1e-6)


def test_inverse_frequency_weights_average_one_over_pixels():
    counts = np.array([5, 1000, 37, 400])
    weights = compute_class_weights(counts, "inverse_frequency")
    assert float((weights * counts).sum() / counts.sum()) == pytest.approx(1.0, rel=1e-6)


def test_class_weights_from_dataset_info():
    info = {"num_classes": 3, "splits": {"train": {"class_pixel_counts": [30, 10, 60]}, "val": {}}}
    np.testing.assert_allclose(compute_class_weights(info, "median_frequency"), [1.0, 3.0, 0.5], rtol=1e-6)
    with pytest.raises(ValueError, match="splits.val.class_pixel_counts"):
        compute_class_weights(info, split="val")
    with pytest.raises(ValueError, match="num_classes=4"):
        compute_class_weights({"num_classes": 4, "splits": {"train": {"class_pixel_counts": [1, 2, 3]}}})
    with pytest.raises(ValueError, match="unknown class weighting 'sqrt'"):
        compute_class_weights([1, 2], "sqrt")
    with pytest.raises(ValueError, match="counts"):
        compute_class_weights([0, 0])
