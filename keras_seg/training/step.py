"""The optimizer, the compiled train step and the evaluation step of a run.

Why a custom step rather than `Model.fit`: `fit` fails under MultiWorkerMirroredStrategy with
Keras 3 (keras-team/keras#20585: "Attempt to convert a value (PerReplica...) to a Tensor"),
while a step run through `strategy.run` over `distribute_datasets_from_function` trains under
the default, Mirrored, MultiWorkerMirrored and TPU strategies alike, and lets augmentation run
inside the compiled step, on the accelerator.

`make_train_steps(state, config, strategy)` returns `train_steps(iterator, n)`: n optimizer steps
in one call, returning their mean loss; `make_eval_step` returns `eval_step(batch)`, which adds a
batch of whole validation images, inferred by the run's inference contract, to `state.val_iou`.
The trainer, the precision probe, the tests and the benchmarks in tools/ all run these.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_seg import augment, finetune
from keras_seg import contract as contracts
from keras_seg.config import TrainConfig
from keras_seg.replicas import accumulation_totals, apply_global_gradients, global_batch_loss, scale_updates


def build_optimizer(config: TrainConfig, learning_rate, variables, clip=True):
    """SGD (momentum, Nesterov), Adam or AdamW, with global-norm clipping unless `clip=False` (the
    trainer clips the gradients summed over replicas itself, `keras_seg.replicas`). Weight decay
    `decoupled` (as Keras applies it: w -= lr * wd * w) skips biases and normalisation parameters,
    i.e. every variable of rank <= 1. With `weight_decay_mode="l2"` the optimizer has none: the
    trainer adds wd * w to every gradient (PyTorch's SGD, `replicas.apply_global_gradients`)."""
    common = {"learning_rate": learning_rate}
    if config.clipnorm and clip:
        common["global_clipnorm"] = config.clipnorm
    decoupled = config.weight_decay if getattr(config, "weight_decay_mode", "decoupled") == "decoupled" else 0.0
    if decoupled:
        common["weight_decay"] = decoupled
    if config.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(momentum=config.momentum, nesterov=config.nesterov, **common)
    elif config.optimizer == "adam":
        optimizer = keras.optimizers.Adam(**common)
    else:
        optimizer = keras.optimizers.AdamW(**common)
    if decoupled:
        optimizer.exclude_from_weight_decay(var_list=[v for v in variables if len(v.shape) <= 1])
    return optimizer


def make_train_steps(state, config: TrainConfig, strategy, log=print):
    """`train_steps(iterator, n)`: n optimizer steps of the run whose state is `state` (a
    `setup.RunState`), each on the iterator's next global batch; returns their mean loss."""
    model, optimizer, loss_fn, step = state.train_model, state.optimizer, state.loss_fn, state.step
    augment_config, seed, accumulate = state.augment_config, config.seed, config.accumulate
    scale_loss = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    aux_weight = state.aux_weight if len(model.outputs) > 1 else 0.0
    micro = config.batch_size  # with --accumulate: the micro-batch, on each replica
    train_iou, encoder_layers = state.train_iou, state.encoder_layers

    def gradients(images, masks, totals=(None, None)):
        with tf.GradientTape() as tape:
            outputs = model(images, training=True)
            logits = outputs[0] if aux_weight else outputs
            loss = global_batch_loss(loss_fn, masks, logits, totals[0])
            if aux_weight:  # the auxiliary head's loss, weighted, on the same masks
                loss += aux_weight * global_batch_loss(loss_fn, masks, outputs[1], totals[1])
            objective = optimizer.scale_loss(loss) if scale_loss else loss
        return loss, logits, tape.gradient(objective, model.trainable_variables)

    def step_totals(images, masks):
        """The loss statistics of the whole accumulated step (main head, auxiliary head), and
        whether the loss's value is to be taken from them (else: the sum of the micro-batches')."""
        if not loss_fn.NEEDS_TOTALS:  # cross-entropy, focal: the valid pixels, from the masks
            counts = accumulation_totals(loss_fn, masks)
            return (counts, counts), False
        # Dice: a forward pass over every micro-batch first. The second pass must see the same
        # network: batch-norm statistics and dropout's seeds go back to where they were.
        saved = [(v, tf.identity(v.value), tf.constant(0.0)) for v in model.non_trainable_variables]
        sums = [None, None]
        for k in range(accumulate):
            part = slice(k * micro, (k + 1) * micro)
            outputs = model(images[part], training=True)
            for head, logits in enumerate(outputs if aux_weight else [outputs]):
                stats = loss_fn.statistics(masks[part], tf.stop_gradient(logits))
                sums[head] = stats if sums[head] is None else tf.nest.map_structure(tf.add, sums[head], stats)
        if saved:
            scale_updates(saved)
        return tuple(None if s is None else accumulation_totals(loss_fn, masks, s) for s in sums), True

    def replica_train_step(images, masks):
        # Seeded by the batch counter: reproducible, different every batch, and resumable.
        step_seed = tf.stack([tf.constant(seed, tf.int64), tf.cast(step, tf.int64)])
        replica = tf.distribute.get_replica_context()
        if replica is not None and replica.num_replicas_in_sync > 1:
            step_seed = tf.random.experimental.stateless_fold_in(
                step_seed, tf.cast(replica.replica_id_in_sync_group, tf.int64), alg="philox")
        images, masks = augment.augment_segmentation(images, masks, step_seed, augment_config)
        update_scales, kept = finetune.encoder_update_scales(encoder_layers, model.trainable_variables,
                                                             config, step, optimizer)
        # The statistics to keep, as they are before the forward pass updates them.
        kept = [(variable, tf.identity(variable.value), scale) for variable, scale in kept]
        if accumulate == 1:
            loss, logits, grads = gradients(images, masks)
            train_iou.update_state(masks, logits)
        else:
            # One optimizer step from `accumulate` micro-batches, with one micro-batch's
            # activations in memory at a time: each micro-batch's loss is normalised by the
            # whole step's statistics, so their gradients add up to the whole step's.
            totals, loss_from_totals = step_totals(images, masks)
            loss, grads = 0.0, None
            for k in range(accumulate):
                part = slice(k * micro, (k + 1) * micro)
                part_loss, logits, part_grads = gradients(images[part], masks[part], totals)
                train_iou.update_state(masks[part], logits)
                loss = part_loss if loss_from_totals else loss + part_loss
                grads = part_grads if grads is None else [a + b for a, b in zip(grads, part_grads)]
        if update_scales is not None:
            # A frozen variable gets no gradient: its optimizer state (momentum, moments) stays put.
            grads = [g if s is None else tf.where(s == 0.0, tf.zeros_like(g), g)
                     for g, s in zip(grads, update_scales)]
        apply_global_gradients(optimizer, grads, model.trainable_variables, config.clipnorm,
                               update_scales=update_scales,
                               l2_decay=config.weight_decay if config.weight_decay_mode == "l2" else 0.0)
        if kept:
            scale_updates(kept)  # the frozen encoder's batch-norm statistics, as they were
        step.assign_add(1)
        return loss

    if config.jit and strategy.num_replicas_in_sync > 1:
        # A replica function compiled with XLA cannot update mirrored variables (Keras, too, turns
        # XLA off under tf.distribute).
        log("--jit: XLA is off with several replicas (a compiled replica step cannot update mirrored variables)")
    elif config.jit:
        replica_train_step = tf.function(replica_train_step, jit_compile=True)

    @tf.function
    def train_steps(iterator, steps):
        total = tf.constant(0.0, tf.float32)
        for _ in tf.range(steps):
            per_replica = strategy.run(replica_train_step, args=next(iterator))
            # Every replica returns the same global-batch loss.
            total += strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None)
        return total / tf.cast(steps, tf.float32)

    return train_steps


def make_eval_step(state, config: TrainConfig, strategy, num_classes: int):
    """`eval_step(batch)`: the batch's whole images inferred by the run's inference contract with
    `state.inference_model`, added to `state.val_iou`."""
    contract = contracts.InferenceContract.from_dict(config.inference)
    model_fn = contracts.keras_model_fn(state.inference_model)
    val_iou = state.val_iou

    def replica_eval_step(images, masks):
        # The last validation batch may leave a replica with no example at all.
        if tf.shape(images)[0] > 0:
            pixels = tf.cast(tf.round(images * 255.0), tf.uint8)  # the reader's floats are uint8 / 255
            probabilities = contracts.contract_probabilities(pixels, model_fn, contract, num_classes)
            val_iou.update_state(masks, probabilities)

    # Validation images of several sizes (VOC at full resolution) would trace the whole eval graph
    # once per size; reduce_retracing makes the second trace generic in the spatial sides.
    @tf.function(reduce_retracing=True)
    def eval_step(batch):
        strategy.run(replica_eval_step, args=batch)

    return eval_step
