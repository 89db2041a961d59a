"""OHEM cross-entropy against a numpy transcription of MMSegmentation's `OhemCrossEntropy.forward`:
softmax, the true class's probability over the valid pixels sorted, threshold max(p[min_kept], thresh),
the mean weighted cross-entropy of the pixels below it."""

import numpy as np
import pytest
import tensorflow as tf

from keras_seg.losses import OhemCrossEntropyLoss, build_loss

IGNORE = 255


def mmseg_ohem(logits, labels, thresh, min_kept, class_weights):
    logits = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    labels = labels.reshape(-1)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    mask = labels != IGNORE
    target = np.where(mask, labels, 0)
    nll = -np.log(probs[np.arange(len(target)), target]) * class_weights[target]
    pred = probs[np.arange(len(target)), target][mask]
    order = np.argsort(pred, kind="stable")
    pred, losses = pred[order], nll[mask][order]
    if pred.size == 0:
        return 0.0
    threshold = max(pred[min(min_kept, pred.size - 1)], thresh)
    return losses[pred < threshold].mean()


@pytest.mark.parametrize("thresh, min_kept", [(0.7, 50), (0.9, 400), (0.3, 10)])
def test_ohem_equals_mmsegmentations_selection(thresh, min_kept):
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 3, (2, 12, 16, 5)).astype(np.float32)
    labels = rng.integers(0, 5, (2, 12, 16)).astype(np.int32)
    labels[0, :3] = IGNORE
    weights = np.array([0.8, 1.0, 1.2, 0.9, 1.1], np.float32)
    expected = mmseg_ohem(logits, labels, thresh, min_kept, weights)
    loss = OhemCrossEntropyLoss(thresh=thresh, min_kept=min_kept, class_weights=weights)
    assert float(loss(labels, logits)) == pytest.approx(expected, rel=1e-5)
    stats = loss.statistics(labels, logits)
    assert float(loss.from_statistics(stats)) == pytest.approx(expected, rel=1e-5)


def test_ohem_keeps_at_least_min_kept_and_only_hard_pixels_get_gradient():
    rng = np.random.default_rng(1)
    logits = tf.Variable(rng.normal(0, 4, (1, 8, 8, 3)).astype(np.float32))
    labels = rng.integers(0, 3, (1, 8, 8)).astype(np.int32)
    loss = OhemCrossEntropyLoss(thresh=0.5, min_kept=20)
    with tf.GradientTape() as tape:
        value = loss(labels, logits)
    grad = np.abs(tape.gradient(value, logits).numpy()).sum(-1).reshape(-1)
    probs = tf.nn.softmax(logits).numpy().reshape(-1, 3)[np.arange(64), labels.reshape(-1)]
    hard = probs < max(np.sort(probs)[20], 0.5)
    assert hard.sum() >= 20
    np.testing.assert_array_equal(grad > 0, hard)


def test_ohem_at_threshold_one_is_the_cross_entropy_and_ignored_only_gives_zero():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 1, (2, 6, 6, 4)).astype(np.float32)
    labels = rng.integers(0, 4, (2, 6, 6)).astype(np.int32)
    labels[1] = IGNORE
    ce = build_loss("ce")(labels, logits)
    assert float(OhemCrossEntropyLoss(thresh=1.0, min_kept=1)(labels, logits)) == pytest.approx(float(ce), rel=1e-5)
    assert float(OhemCrossEntropyLoss()(np.full_like(labels, IGNORE), logits)) == 0.0


def test_ohem_is_a_loss_term_and_checks_its_arguments():
    combined = build_loss("ohem+0.5*dice")
    assert isinstance(combined.losses[0][1], OhemCrossEntropyLoss) and combined.NEEDS_TOTALS
    with pytest.raises(ValueError, match="thresh"):
        OhemCrossEntropyLoss(thresh=0.0)
    with pytest.raises(ValueError, match="min_kept"):
        OhemCrossEntropyLoss(min_kept=0)
