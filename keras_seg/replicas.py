"""One update from all replicas: the global-batch loss, and gradients that agree before they are applied.

N replicas (GPUs, workers) must train the model one device trains on the same global batch. Two
things stand in the way when each replica follows Keras' defaults:

* The loss. A segmentation loss is normalised by something the batch decides (the valid-pixel
  count; Dice's per-class sums), and each replica would normalise by its own part. Here each
  replica computes the loss's sums (`loss.statistics`), they are summed across replicas, and the
  loss is computed once from the global sums (`loss.from_statistics`). The forward value is the
  global one; the gradient flows through the replica's own sums only, so the replicas' gradients
  add up to the gradient of the global loss.
* The update. Keras 3's TensorFlow optimizer sums the gradients across replicas inside `apply`,
  after it has clipped them, and `LossScaleOptimizer` decides finite / not finite from the first
  replica's gradients before that sum. So clipping would be per replica, and an overflow on
  another replica would be applied. Here the gradients are summed first (every replica then holds
  the global gradient), clipped by the global norm, and handed to the optimizer divided by the
  replica count: its own sum across replicas gives back the global gradient, and its finite check
  and loss-scale update see the same gradients on every replica. The optimizer has no public way to
  skip its sum, and calling its private update step would tie us to one Keras version; the price
  is a second all-reduce of the gradients (checked with Keras 3.15).
"""

from __future__ import annotations

import keras
import tensorflow as tf


def _replicas():
    context = tf.distribute.get_replica_context()
    return 1 if context is None else context.num_replicas_in_sync


def sum_over_replicas(values):
    """`values` (a nest of tensors) summed over the replicas, in a replica context; unchanged alone."""
    if _replicas() == 1:
        return values
    return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, values)


def global_batch_loss(loss, y_true, y_pred, totals=None):
    """The loss over the global batch (every replica's part), differentiable in this replica's part.

    `loss` is a keras_seg loss with `statistics` / `from_statistics` (`keras_seg.losses`).
    `totals`: for one micro-batch of an accumulated step, statistics already summed over every
    replica and micro-batch (a nest like `statistics`', possibly with fewer keys); a statistic it
    holds replaces the replicas' sum in the loss's value (not in its gradient). With the valid-pixel
    count of the whole step, the cross-entropy's gradients of the micro-batches add up to that of
    the whole step (its value is then this micro-batch's share); with every total (Dice), each
    micro-batch's gradient is its part of the whole step's, and its value the whole step's loss.
    """
    local = loss.statistics(y_true, y_pred)
    total = sum_over_replicas(local)

    def combine(mine, everyone, known):
        if isinstance(mine, dict):
            return {key: combine(mine[key], everyone[key], known.get(key, {})) for key in mine}
        known = everyone if isinstance(known, dict) else known
        return mine + tf.stop_gradient(known - mine)

    return loss.from_statistics(combine(local, total, totals or {}))


def accumulation_totals(loss, masks, statistics=None):
    """The statistics of a whole accumulated step, for `global_batch_loss(totals=...)`: summed over
    the replicas, from the masks alone or, given `statistics` (summed over the micro-batches of this
    replica), those."""
    return sum_over_replicas(loss.mask_statistics(masks) if statistics is None else statistics)


def apply_global_gradients(optimizer, grads, variables, clipnorm=None, update_scales=None, l2_decay=0.0):
    """Sum `grads` over the replicas, clip by their global norm, and apply them once.

    Args:
        optimizer: a Keras optimizer without clipping of its own (or a `LossScaleOptimizer` around one).
        grads: this replica's gradients of the global-batch loss (scaled by the loss scale under
            a `LossScaleOptimizer`).
        variables: the variables to update.
        clipnorm: float or None: clip the global gradient's norm to this (unscaled).
        update_scales: None, or per variable None or a scalar tensor: that variable's update, as
            the optimizer makes it (momentum, Adam's moments, decoupled weight decay included), is
            multiplied by it; 0 keeps the variable bit for bit. Keras 3 has no per-variable
            learning rate, and Adam's updates do not scale with the gradient: this is a learning
            rate multiplier (an encoder's), on the clipped global gradient.
        l2_decay: float. PyTorch's SGD weight decay (MMSegmentation's): `l2_decay * w` joins each
            variable's gradient after the clipping (torch's `clip_grad_norm_` runs before
            `optimizer.step()`, which adds it) and before the momentum; not for a variable whose
            update scale is 0 (frozen: its momentum stays put).
    """
    scaled = []
    if update_scales is not None:
        scaled = [(v, tf.identity(v.value), s) for v, s in zip(variables, update_scales) if s is not None]
    replicas = _replicas()
    grads = sum_over_replicas(list(grads))
    if clipnorm:
        scale = optimizer.dynamic_scale if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) else 1.0
        # A non-finite norm makes every gradient NaN: a loss-scaled step is then skipped as a whole.
        clipped, _ = tf.clip_by_global_norm([g / scale for g in grads], clipnorm)
        grads = [g * scale for g in clipped]
    if l2_decay:
        scale = optimizer.dynamic_scale if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) else 1.0
        scales = update_scales if update_scales is not None else [None] * len(variables)
        grads = [g + tf.where(s == 0.0, 0.0, 1.0) * l2_decay * scale * v.value if s is not None
                 else g + l2_decay * scale * v.value for g, v, s in zip(grads, variables, scales)]
    if replicas > 1:
        grads = [g / replicas for g in grads]  # the optimizer's own all-reduce sums them back
    optimizer.apply(grads, variables)
    if scaled:
        scale_updates(scaled)


def scale_updates(updates):
    """`variable = before + scale * (variable - before)` for each `(variable, before, scale)`.

    In a replica context: `before` and `scale` are this replica's (the same on every replica);
    each mirrored variable is written once per device, as the optimizer writes it. A scale of 1
    leaves the variable as it is and 0 restores `before`, both exactly.
    """
    def rescale(variable, before, scale):
        moved = before + tf.cast(scale, variable.dtype) * (variable - before)
        return variable.assign(tf.where(scale == 1.0, variable, tf.where(scale == 0.0, before, moved)))

    def merge(strategy, updates):
        for variable, before, scale in updates:
            strategy.extended.update(variable.value, rescale, args=(before, scale), group=False)

    tf.distribute.get_replica_context().merge_call(merge, args=(updates,))
