"""A run's numbers, its state and its input streams, built from its config.

`RunShape` is what the config and the data imply before anything is built (classes, replicas,
batch, steps an epoch, learning rate); `build_state` builds what a checkpoint holds (models,
optimizer, schedule, counters) and what the step needs beside it (loss, augmentation, metrics);
`build_datasets` opens the training stream at a step and the validation split. The trainer, the
precision probe, the tests and the benchmarks build a step the same way, from these.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from keras_seg import augment, data, finetune, losses, metrics, tfrecord
from keras_seg.config import TrainConfig, progressive_size
from keras_seg.models import presets
from keras_seg.training import schedules
from keras_seg.training.step import build_optimizer

# The schedule's end before a time-budget run has planned its length (the decay has not begun).
UNPLANNED = 2**40


@dataclasses.dataclass
class RunShape:
    """What a run's config and data imply, before anything is built."""

    info: dict
    num_classes: int
    class_names: list
    val_split: str
    replicas: int
    global_batch: int  # examples a step on all replicas, before accumulation
    examples_per_step: int  # global_batch x accumulate: one optimizer update
    steps_per_epoch: int
    learning_rate: float  # the base rate, scaled to the batch where the config asks
    # Images in a val batch on all replicas: whole images at their own size, so a split of several
    # sizes goes one image per replica. The planner counts, and partial validations score, in these.
    val_batch: int

    @property
    def val_examples(self) -> int:
        return int(self.info["splits"][self.val_split]["num_examples"])


def describe_run(config: TrainConfig, replicas: int, info=None) -> RunShape:
    """The run's numbers from its config and its data's dataset_info.json (`info`: that dict, given)."""
    info = tfrecord.load_dataset_info(config.data) if info is None else info
    global_batch = config.batch_size * replicas
    examples_per_step = global_batch * config.accumulate
    train_examples = int(info["splits"]["train"]["num_examples"])
    learning_rate = config.learning_rate
    if config.scale_lr_to_batch:
        learning_rate *= examples_per_step / config.scale_lr_to_batch
    val_split = tfrecord.validation_split(info) or "val"
    per_replica = config.val_batch_size if tfrecord.has_one_image_size(info, val_split) else 1
    return RunShape(info=info, num_classes=int(info["num_classes"]), class_names=list(info["class_names"]),
                    val_split=val_split, replicas=replicas,
                    global_batch=global_batch, examples_per_step=examples_per_step,
                    steps_per_epoch=config.steps_per_epoch or max(1, train_examples // examples_per_step),
                    learning_rate=learning_rate, val_batch=per_replica * replicas)


def fixed_total(config: TrainConfig, shape: RunShape):
    """The run's step count when it is given (--iters, --epochs); None for a time budget."""
    if config.iters:
        return config.iters
    if config.epochs:
        return config.epochs * shape.steps_per_epoch
    return None


def warmup_steps(config: TrainConfig, shape: RunShape, total_steps, log=print) -> int:
    warmup = config.warmup_iters if config.warmup_iters is not None else int(
        round(config.warmup_epochs * shape.steps_per_epoch))
    if total_steps is not None and warmup > total_steps // 2:
        log(f"warm-up of {warmup} steps shortened to half of the run's {total_steps} steps")
        warmup = total_steps // 2
    return warmup


@dataclasses.dataclass
class RunState:
    """The models, optimizer, schedule and counters of a run (what its checkpoint holds), and what
    its step uses beside them."""

    train_model: keras.Model  # with an auxiliary head, its logits too
    model: keras.Model  # saved, validated and exported: the training graph without the auxiliary head
    inference_model: keras.Model  # the same weights, float32, at the inference contract's input size
    aux_weight: float
    encoder_layers: list
    schedule: schedules.WarmupDecaySchedule
    step: tf.Variable  # batches seen: seeds augmentation, positions the input stream, drives the schedule
    optimizer: keras.optimizers.Optimizer
    train_iou: metrics.MeanIoU
    val_iou: metrics.MeanIoU
    best: tf.Variable
    wait: tf.Variable
    elapsed: tf.Variable
    loss_fn: object
    augment_config: augment.AugmentConfig
    checkpoint: tf.train.Checkpoint


def build_models(config: TrainConfig, num_classes: int, replicas: int, precision: str, log=print):
    """(train_model, model, inference_model, aux_weight, encoder_layers), under the current strategy scope."""
    # A progressive run trains at two sizes: its model takes any (the builders' None sides).
    entry = {"model": config.model, "input_size": (None, None) if config.progressive else tuple(config.image_size)}
    # A resumed or --init-from run replaces the encoder's initial weights: none are loaded.
    weights = None if config.resume or config.init_from else config.encoder_weights
    train_model = presets.build_model(entry, num_classes, encoder_weights=weights, with_aux=True)
    model = train_model
    if len(train_model.outputs) > 1:
        model = keras.Model(train_model.input, train_model.outputs[0], name=train_model.name)
    encoder_layers = finetune.encoder_layers(train_model)
    if weights not in (None, "none"):
        log(f"encoder weights: {weights}")
    finetune.freeze_encoder_layers(encoder_layers, config, log)
    if replicas > 1:
        # Batch statistics over the global batch (SyncBN). Keras' BatchNormalization otherwise
        # updates its moving statistics from each replica's own batch, and the workers of a
        # multi-worker run end with different statistics.
        for layer in train_model._flatten_layers(include_self=False, recursive=True):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.synchronized = True
    inference_model = model
    inference_size = tuple(config.inference["input_size"])
    if config.inference.get("size_divisor"):
        inference_size = (None, None)  # whole images at their own size (keras_seg.contract)
    if inference_size != tuple(config.image_size) or precision != "float32":
        # The same weights in a model built for the contract's input (whole images at another
        # size than the training crops) and in float32, refreshed before each validation:
        # validation scores what `evaluate` and the export (float32) score.
        policy = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_dtype_policy("float32")
        try:
            inference_model = presets.build_model({"model": config.model, "input_size": inference_size}, num_classes)
        finally:
            keras.mixed_precision.set_dtype_policy(policy)
    return train_model, model, inference_model, presets.aux_weight_of(config.model), encoder_layers


def build_state(config: TrainConfig, shape: RunShape, strategy, precision: str, total_steps=None,
                log=print) -> RunState:
    """Everything a run's step and checkpoint need, from the config's seed (the same initial weights
    for the same seed). `total_steps` None: a time budget, planned later."""
    keras.utils.set_random_seed(config.seed)
    warmup = warmup_steps(config, shape, total_steps, log)
    with strategy.scope():
        train_model, model, inference_model, aux_weight, encoder_layers = build_models(
            config, shape.num_classes, shape.replicas, precision, log)
        shape_name = "constant" if config.schedule == "plateau" else config.schedule
        schedule = schedules.WarmupDecaySchedule(
            shape.learning_rate, shape_name, total_steps=total_steps or UNPLANNED, warmup_steps=warmup,
            final_ratio=config.final_lr_ratio, power=config.poly_power)
        # It advances on every batch, also when a mixed_float16 step is skipped for non-finite
        # gradients (the optimizer's own counter does not).
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step",
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        optimizer = build_optimizer(config, lambda: schedule(step), train_model.trainable_variables, clip=False)
        if precision == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(train_model.trainable_variables)
        train_iou = metrics.MeanIoU(shape.num_classes, name="train_miou")
        val_iou = metrics.MeanIoU(shape.num_classes, name="val_miou")
    best = tf.Variable(-1.0, dtype=tf.float64, trainable=False, name="best_val_miou")
    wait = tf.Variable(0, dtype=tf.int64, trainable=False, name="validations_without_improvement")
    elapsed = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="seconds_spent")
    counts = shape.info["splits"]["train"].get("class_pixel_counts")
    loss_fn = losses.build_loss(config.loss, num_classes=shape.num_classes, class_weights=config.class_weights,
                                class_pixel_counts=counts)
    checkpoint = tf.train.Checkpoint(model=train_model, optimizer=optimizer, step=step, schedule=schedule,
                                     best=best, wait=wait, elapsed=elapsed)
    return RunState(train_model=train_model, model=model, inference_model=inference_model, aux_weight=aux_weight,
                    encoder_layers=encoder_layers, schedule=schedule, step=step, optimizer=optimizer,
                    train_iou=train_iou, val_iou=val_iou, best=best, wait=wait, elapsed=elapsed, loss_fn=loss_fn,
                    augment_config=augment.AugmentConfig.from_dict(config.augment), checkpoint=checkpoint)


@dataclasses.dataclass
class Datasets:
    train: object  # a distributed dataset of training batches (repeated)
    val: object  # a distributed dataset of the validation split, whole images
    cache_lock: object = None  # held while this run writes its file cache (data.claim_file_cache)


def training_sizing(config: TrainConfig, low=False) -> dict:
    """How the reader sizes training examples: at image_size, or (`low`) a progressive run's first size,
    its scale_crop base scale shrunk alike."""
    size, base_scale = list(config.image_size), config.base_scale
    if low:
        size = progressive_size(config)
        if base_scale:
            base_scale = [int(round(side * config.progressive_scale)) for side in base_scale]
    return dict(image_size=tuple(size), resize_mode=config.resize_mode, base_scale=base_scale,
                ratio_range=tuple(config.ratio_range), cat_max_ratio=config.cat_max_ratio,
                class_uniform=config.class_uniform)


def build_training_stream(config: TrainConfig, shape: RunShape, strategy, start_step: int, low=False):
    """The training stream from `start_step` (a resumed stream counts the records of a pass), distributed."""
    sizing = training_sizing(config, low)

    def train_fn(ctx):
        # A pipeline feeds (replicas / pipelines) replicas one batch each per step; a resumed run
        # starts each pipeline's stream where the checkpoint's step left it.
        per_step = ctx.get_per_replica_batch_size(shape.examples_per_step) * (
            ctx.num_replicas_in_sync // ctx.num_input_pipelines)
        return data.build_dataset(
            config.data, "train", training=True, repeat=True, input_context=ctx,
            batch_size=shape.examples_per_step, shuffle_seed=config.seed, cache=config.cache,
            start_example=start_step * per_step, **sizing)

    return strategy.distribute_datasets_from_function(train_fn)


def build_datasets(config: TrainConfig, shape: RunShape, strategy, start_step: int, log=print,
                   low=False) -> Datasets:
    """The training stream from `start_step` (`low`: at a progressive run's first size) and the val split."""
    cache, lock = config.cache, None
    if cache not in (None, "memory") and not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        lock = data.claim_file_cache(cache, log=log)
    train = build_training_stream(config, shape, strategy, start_step, low)

    # Validation follows the inference contract on whole images at their original size, as
    # evaluate, predict and the export do (shape.val_batch).
    val = data.distribute_dataset(strategy, config.data, shape.val_split, batch_size=shape.val_batch,
                                  training=False, drop_remainder=False, cache=cache, image_size=None)
    return Datasets(train=train, val=val, cache_lock=lock)


def check_resume_shape(config: TrainConfig, shape: RunShape, precision: str):
    """A resumed run continues only with the examples per step and precision it was trained with.

    Its input position is `step x examples_per_step` and its learning rate may be scaled to the
    batch: on another replica count it would replay or skip data and change its rate silently.
    Its checkpoint holds the optimizer of its precision (mixed_float16's loss scale): across
    precisions the restore fails inside TensorFlow. Both are refused here, in one line (ValueError).
    """
    recorded = config.resolved
    examples, replicas = recorded.get("examples_per_step"), recorded.get("replicas")
    if examples is not None and examples != shape.examples_per_step:
        raise ValueError(
            f"--resume: {config.output} was trained on {replicas} replica(s), {examples} examples a step; "
            f"here {shape.replicas} replica(s) make {shape.examples_per_step}, so its input position and "
            f"learning rate would not continue: resume where {replicas} device(s) are used, or start a "
            f"new run with --init-from {config.output}")
    recorded_precision = recorded.get("precision")
    if recorded_precision and recorded_precision != precision:
        raise ValueError(
            f"--resume: {config.output} was trained in {recorded_precision}, and --precision {config.precision} "
            f"gives {precision} here; its optimizer state does not restore across precisions: resume "
            f"with --precision {recorded_precision}, or start a new run with --init-from {config.output}")
