"""The training loop, one for every `tf.distribute` strategy.

Why a custom loop rather than `Model.fit`: `fit` fails under MultiWorkerMirroredStrategy with
Keras 3 (keras-team/keras#20585: "Attempt to convert a value (PerReplica...) to a Tensor"),
while a step run through `strategy.run` over `distribute_datasets_from_function` trains under
the default, Mirrored, MultiWorkerMirrored and TPU strategies alike. One loop for all of them is
simpler to trust than `fit` for some and a loop for others, and it lets augmentation run inside
the compiled step, on the accelerator.

The run is counted in steps (one optimizer update: `accumulate` batches). Its length is given as
steps, epochs, or a time budget (`keras_seg.budget`), and the learning-rate schedule
(`keras_seg.schedules`) ends with it. The checkpoint holds everything that decides what comes
next: model, optimizer, the step counter (which also seeds augmentation and positions the input
stream, `data.build_dataset(start_example=...)`), the schedule's variables, the best metric, the
early-stopping and plateau counters and the time already spent. So a run resumed from the
checkpoint of step k trains on the same batches, with the same augmentation, as the run that
was interrupted would have.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from keras_seg import augment, data, distribute, finetune, losses, metrics, precision_probe, schedules, tfrecord
from keras_seg import visualize
from keras_seg import contract as contracts
from keras_seg.budget import TimeBudget, process_start_time, window_seconds
from keras_seg.config import TrainConfig
from keras_seg.files import write_json_atomically
from keras_seg.replicas import accumulation_totals, apply_global_gradients, global_batch_loss, scale_updates
from keras_seg.models import presets
from keras_seg.run_dir import History, RunDir, save_model_atomically, weights_fingerprint, write_best

# Validations in a run sized by --iters or --time-budget when --val-every is not given.
DEFAULT_VALIDATIONS = 10
# The schedule's end before a time-budget run has planned its length (the decay has not begun).
UNPLANNED = 2**40


# The training iterator of the latest run in this process (`keep_until_exit`).
_KEPT_ITERATORS = []


def keep_until_exit(iterator):
    """Keep the training stream's iterator alive past the end of its run (None: keep none).

    Deleting a tf.distribute iterator waits for tf.data's autotuning threads, which sleep between
    optimisations for up to a minute and are not woken by the deletion: at the end of 3- to
    10-minute runs on CPU-C, 5 of 7 runs past one pass over the data sat idle for 41-113 s between
    their last step and their final phase (gdb: `RootDataset::Iterator::~Iterator` waiting for
    `Model::OptimizeLoop`), past their time budgets. The command line ends its process without
    deleting it (`train.command`); in a Python session it goes when the next run starts.
    """
    _KEPT_ITERATORS[:] = [] if iterator is None else [iterator]


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


class Trainer:
    """Trains one run; `run()` returns the best validation metrics.

    Args:
        config: a validated `TrainConfig` (with `output` and `data` set).
        log: where progress lines go.
        started_at: the wall-clock time the run's time budget counts from (default: process start).
    """

    def __init__(self, config: TrainConfig, *, log=print, started_at=None):
        self.config = config
        self.log = log
        self.started_at = process_start_time() if started_at is None else started_at
        self.strategy = distribute.choose_strategy(config.strategy, config.devices)
        self.precision, self.precision_reason = distribute.choose_precision(config.precision)
        self.precision_measured = {}  # seconds a step per precision, where `auto` timed them
        if self.precision != distribute.MEASURE:  # else decided when the run starts (`run`)
            keras.mixed_precision.set_dtype_policy(self.precision)
        self.chief = distribute.is_chief(self.strategy)
        # Non-chief workers write what they must (checkpoints are collective) to scratch space.
        self.run_dir = RunDir(config.output if self.chief else tempfile.mkdtemp(prefix="keras_seg_worker_"))
        self.info = tfrecord.load_dataset_info(config.data)
        self.num_classes = int(self.info["num_classes"])
        self.class_names = list(self.info["class_names"])
        self.val_split = tfrecord.validation_split(self.info) or "val"
        self.replicas = self.strategy.num_replicas_in_sync
        self.global_batch = config.batch_size * self.replicas
        self.examples_per_step = self.global_batch * config.accumulate
        train_examples = int(self.info["splits"]["train"]["num_examples"])
        self.steps_per_epoch = config.steps_per_epoch or max(1, train_examples // self.examples_per_step)
        self.learning_rate = config.learning_rate
        if config.scale_lr_to_batch:
            self.learning_rate *= self.examples_per_step / config.scale_lr_to_batch

    # ----------------------------------------------------------------------- set-up

    def _build(self):
        config = self.config
        keras.utils.set_random_seed(config.seed)  # the same initial weights for the same seed
        if config.warmup_iters is not None:
            warmup = config.warmup_iters
        else:
            warmup = int(round(config.warmup_epochs * self.steps_per_epoch))
        self.total_steps = self._fixed_total()
        if self.total_steps is not None and warmup > self.total_steps // 2:
            self.log(f"warm-up of {warmup} steps shortened to half of the run's {self.total_steps} steps")
            warmup = self.total_steps // 2
        with self.strategy.scope():
            entry = {"model": config.model, "input_size": tuple(config.image_size)}
            # A resumed or --init-from run replaces the encoder's initial weights: none are loaded.
            weights = None if config.resume or config.init_from else config.encoder_weights
            # The training model; with an auxiliary head it also outputs the head's logits, and
            # `self.model` (saved, validated, exported) is the same graph without it.
            self.train_model = presets.build_model(entry, self.num_classes, encoder_weights=weights, with_aux=True)
            self.model = self.train_model
            if len(self.train_model.outputs) > 1:
                self.model = keras.Model(self.train_model.input, self.train_model.outputs[0],
                                         name=self.train_model.name)
            self.aux_weight = presets.aux_weight_of(config.model)
            self.encoder_layers = finetune.encoder_layers(self.train_model)
            if weights not in (None, "none"):
                self.log(f"encoder weights: {weights}")
            finetune.freeze_encoder_layers(self.encoder_layers, config, self.log)
            if self.replicas > 1:
                # Batch statistics over the global batch (SyncBN). Keras' BatchNormalization
                # otherwise updates its moving statistics from each replica's own batch, and the
                # workers of a multi-worker run end with different statistics.
                for layer in self.train_model._flatten_layers(include_self=False, recursive=True):
                    if isinstance(layer, keras.layers.BatchNormalization):
                        layer.synchronized = True
            self.inference_model = self.model
            inference_size = tuple(config.inference["input_size"])
            if config.inference.get("size_divisor"):
                inference_size = (None, None)  # whole images at their own size (keras_seg.contract)
            if inference_size != tuple(config.image_size) or self.precision != "float32":
                # The same weights in a model built for the contract's input (whole images at
                # another size than the training crops) and in float32, refreshed before each
                # validation: validation scores what `evaluate` and the export (float32) score.
                policy = keras.mixed_precision.global_policy()
                keras.mixed_precision.set_dtype_policy("float32")
                try:
                    self.inference_model = presets.build_model(
                        {"model": config.model, "input_size": inference_size}, self.num_classes)
                finally:
                    keras.mixed_precision.set_dtype_policy(policy)
            shape = "constant" if config.schedule == "plateau" else config.schedule
            self.schedule = schedules.WarmupDecaySchedule(
                self.learning_rate, shape, total_steps=self.total_steps or UNPLANNED, warmup_steps=warmup,
                final_ratio=config.final_lr_ratio, power=config.poly_power)
            # Batches seen: seeds augmentation, positions the input stream and drives the schedule.
            # It advances on every batch, also when a mixed_float16 step is skipped for non-finite
            # gradients (the optimizer's own counter does not).
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step",
                                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            optimizer = build_optimizer(config, lambda: self.schedule(self.step), self.train_model.trainable_variables,
                                        clip=False)
            if self.precision == "mixed_float16":
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            self.optimizer = optimizer
            self.optimizer.build(self.train_model.trainable_variables)
            self.train_iou = metrics.MeanIoU(self.num_classes, name="train_miou")
            self.val_iou = metrics.MeanIoU(self.num_classes, name="val_miou")
        self.best = tf.Variable(-1.0, dtype=tf.float64, trainable=False, name="best_val_miou")
        self.wait = tf.Variable(0, dtype=tf.int64, trainable=False, name="validations_without_improvement")
        self.elapsed = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="seconds_spent")
        counts = self.info["splits"]["train"].get("class_pixel_counts")
        self.loss_fn = losses.build_loss(config.loss, num_classes=self.num_classes,
                                         class_weights=config.class_weights, class_pixel_counts=counts)
        self.augment_config = augment.AugmentConfig.from_dict(config.augment)
        self.checkpoint = tf.train.Checkpoint(model=self.train_model, optimizer=self.optimizer, step=self.step,
                                              schedule=self.schedule, best=self.best, wait=self.wait,
                                              elapsed=self.elapsed)
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.run_dir.checkpoints, max_to_keep=2,
                                                  step_counter=self.step)

    def _fixed_total(self):
        config = self.config
        if config.iters:
            return config.iters
        if config.epochs:
            return config.epochs * self.steps_per_epoch
        return None  # a time budget: planned once the step is measured

    def _datasets(self, start_step):
        config = self.config
        if config.cache not in (None, "memory") and not isinstance(self.strategy,
                                                                    tf.distribute.MultiWorkerMirroredStrategy):
            self._cache_lock = data.claim_file_cache(config.cache, log=self.log)
        sizing = dict(image_size=tuple(config.image_size), resize_mode=config.resize_mode,
                      base_scale=config.base_scale, ratio_range=tuple(config.ratio_range),
                      cat_max_ratio=config.cat_max_ratio)

        def train_fn(ctx):
            # A pipeline feeds (replicas / pipelines) replicas one batch each per step; a resumed
            # run starts each pipeline's stream where the checkpoint's step left it.
            per_step = ctx.get_per_replica_batch_size(self.examples_per_step) * (
                ctx.num_replicas_in_sync // ctx.num_input_pipelines)
            return data.build_dataset(
                config.data, "train", training=True, repeat=True, input_context=ctx,
                batch_size=self.examples_per_step, shuffle_seed=config.seed, cache=config.cache,
                start_example=start_step * per_step, **sizing)

        self.train_data = self.strategy.distribute_datasets_from_function(train_fn)
        # Validation follows the inference contract on whole images at their original size, as
        # evaluate, predict and the export do; images of several sizes go one per replica.
        per_replica = config.val_batch_size if tfrecord.has_one_image_size(self.info, self.val_split) else 1
        self.val_data = data.distribute_dataset(
            self.strategy, config.data, self.val_split, batch_size=per_replica * self.replicas, training=False,
            drop_remainder=False, cache=config.cache, image_size=None)

    # ----------------------------------------------------------------------- steps

    def _make_steps(self):
        config, strategy = self.config, self.strategy
        model, optimizer, loss_fn, step = self.train_model, self.optimizer, self.loss_fn, self.step
        augment_config, seed, accumulate = self.augment_config, config.seed, config.accumulate
        scale_loss = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        aux_weight = self.aux_weight if len(model.outputs) > 1 else 0.0
        micro = config.batch_size  # with --accumulate: the micro-batch, on each replica

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
            state = [(v, tf.identity(v.value), tf.constant(0.0)) for v in model.non_trainable_variables]
            sums = [None, None]
            for k in range(accumulate):
                part = slice(k * micro, (k + 1) * micro)
                outputs = model(images[part], training=True)
                for head, logits in enumerate(outputs if aux_weight else [outputs]):
                    stats = loss_fn.statistics(masks[part], tf.stop_gradient(logits))
                    sums[head] = stats if sums[head] is None else tf.nest.map_structure(tf.add, sums[head], stats)
            if state:
                scale_updates(state)
            return tuple(None if s is None else accumulation_totals(loss_fn, masks, s) for s in sums), True

        def replica_train_step(images, masks):
            # Seeded by the batch counter: reproducible, different every batch, and resumable.
            step_seed = tf.stack([tf.constant(seed, tf.int64), tf.cast(step, tf.int64)])
            replica = tf.distribute.get_replica_context()
            if replica is not None and replica.num_replicas_in_sync > 1:
                step_seed = tf.random.experimental.stateless_fold_in(
                    step_seed, tf.cast(replica.replica_id_in_sync_group, tf.int64), alg="philox")
            images, masks = augment.augment_segmentation(images, masks, step_seed, augment_config)
            update_scales, kept = finetune.encoder_update_scales(self.encoder_layers, model.trainable_variables,
                                                                 config, step, optimizer)
            # The statistics to keep, as they are before the forward pass updates them.
            kept = [(variable, tf.identity(variable.value), scale) for variable, scale in kept]
            if accumulate == 1:
                loss, logits, grads = gradients(images, masks)
                self.train_iou.update_state(masks, logits)
            else:
                # One optimizer step from `accumulate` micro-batches, with one micro-batch's
                # activations in memory at a time: each micro-batch's loss is normalised by the
                # whole step's statistics, so their gradients add up to the whole step's.
                totals, loss_from_totals = step_totals(images, masks)
                loss, grads = 0.0, None
                for k in range(accumulate):
                    part = slice(k * micro, (k + 1) * micro)
                    part_loss, logits, part_grads = gradients(images[part], masks[part], totals)
                    self.train_iou.update_state(masks[part], logits)
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

        contract = contracts.InferenceContract.from_dict(config.inference)
        inference_model = self.inference_model
        model_fn = contracts.keras_model_fn(inference_model)

        def replica_eval_step(images, masks):
            # The last validation batch may leave a replica with no example at all.
            if tf.shape(images)[0] > 0:
                pixels = tf.cast(tf.round(images * 255.0), tf.uint8)  # the reader's floats are uint8 / 255
                probabilities = contracts.contract_probabilities(pixels, model_fn, contract, self.num_classes)
                self.val_iou.update_state(masks, probabilities)

        if config.jit and self.replicas > 1:
            # A replica function compiled with XLA cannot update mirrored variables (Keras, too,
            # turns XLA off under tf.distribute).
            self.log("--jit: XLA is off with several replicas (a compiled replica step cannot update "
                     "mirrored variables)")
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

        # Validation images of several sizes (VOC at full resolution) would trace the whole eval
        # graph once per size; reduce_retracing makes the second trace generic in the spatial sides.
        @tf.function(reduce_retracing=True)
        def eval_step(batch):
            strategy.run(replica_eval_step, args=batch)

        return train_steps, eval_step

    # ----------------------------------------------------------------------- the run

    def run(self):
        config, paths = self.config, self.run_dir
        os.makedirs(paths.root, exist_ok=True)
        if self.precision == distribute.MEASURE:
            self.precision, self.precision_reason, self.precision_measured = precision_probe.choose(self, log=self.log)
            keras.mixed_precision.set_dtype_policy(self.precision)
        if config.resume:
            self._check_same_hardware()
        self._build()
        if config.resume:
            # Every worker restores the chief's checkpoint (the run directory must be on storage
            # that every worker sees); the others write theirs to scratch space.
            checkpoints = os.path.join(config.output, "checkpoints")
            latest = tf.train.latest_checkpoint(checkpoints)
            if latest is None:
                raise ValueError(f"--resume: no checkpoint in {checkpoints}")
            try:
                # Every variable of the model and optimizer must come from the checkpoint: one that
                # does not (another keras-seg's layout) is an error, not a silent fresh start.
                self.checkpoint.restore(latest).assert_existing_objects_matched()
            except (AssertionError, ValueError, tf.errors.OpError) as err:
                why = (str(err).strip().splitlines() or [""])[0][:200]
                raise ValueError(f"--resume: {latest} does not restore into this run's model and optimizer "
                                 f"({type(err).__name__}: {why}); start a new run with --init-from "
                                 f"{config.output}") from None
            self.log(f"resuming {config.output} at step {int(self.step.numpy())} (best val mIoU so far "
                     f"{self.best.numpy():.4f}, weights fingerprint {weights_fingerprint(self.model)})")
        elif config.init_from:
            self._init_from(config.init_from)
        start_step = int(self.step.numpy())
        planned = int(self.schedule.total_steps.numpy())
        if config.resume and self.total_steps is not None and planned != self.total_steps:
            # A new length given with --resume: the decay now ends there, from the rate reached.
            self.schedule.retarget(start_step, self.total_steps)
            self.log(f"the schedule now ends at step {self.total_steps} (was {planned})")
        self._spent_before = float(self.elapsed.numpy())  # by the processes this run was resumed from
        budget, self._validated = None, False
        if config.time_budget:
            # What the interrupted runs spent counts against the budget; this process's start-up too.
            seconds = 60 * config.time_budget
            budget = TimeBudget(self.started_at + seconds - self._spent_before, margin=0.02 * seconds,
                                export=config.export, window=window_seconds(seconds), report=True)
            self.total_steps = planned if config.resume and planned < UNPLANNED else None
        self._write_config()
        try:
            self._datasets(start_step)  # a resumed stream counts the records of a pass
        except tf.errors.DataLossError as err:
            raise self._damaged_data(err) from None
        train_steps, eval_step = self._make_steps()
        writer = tf.summary.create_file_writer(paths.logs) if self.chief else tf.summary.create_noop_writer()
        history = History(paths.history, keep_until_step=start_step if config.resume else 0)
        self.log(f"training {self.model.name}: {self.model.count_params():,} parameters, {self.precision}, "
                 f"strategy {distribute.strategy_name(self.strategy)} x{self.replicas} replicas, global batch "
                 f"{self.global_batch}" + (f" x{config.accumulate} accumulated" if config.accumulate > 1 else "")
                 + f", {self.steps_per_epoch} steps/epoch, " + self._length_text())
        self.log(f"precision {self.precision}: {self.precision_reason}")
        if config.scale_lr_to_batch:
            self.log(f"learning rate scaled to the batch: {config.learning_rate:g} x {self.examples_per_step}/"
                     f"{config.scale_lr_to_batch} = {self.learning_rate:g}")
        iterator = iter(self.train_data)
        # With a file cache it goes at the end of the loop, as before: its deletion is when TensorFlow
        # removes a cache it has only partly written.
        keep_until_exit(iterator if config.cache in (None, "memory") else None)
        try:
            summary = self._loop(train_steps, eval_step, iterator, history, writer, budget)
        except tf.errors.DataLossError as err:  # a shard damaged on disk, met mid-run
            raise self._damaged_data(err) from None
        except KeyboardInterrupt:
            self._save_checkpoint()
            raise
        finally:
            del iterator
            history.close()
            writer.close()
        last_step_at = time.time()
        self._finish()
        if config.time_budget:
            self.log(f"time budget {config.time_budget:g} min: {summary['steps']} steps; the last step ended "
                     f"{(last_step_at - self.started_at) / 60:.2f} min after the start, the run "
                     f"{(time.time() - self.started_at) / 60:.2f} min (this process; planned final phase "
                     f"{budget.final_seconds(0.0):.0f} s, took {time.time() - last_step_at:.0f} s)")
        return summary

    def _damaged_data(self, err):
        """A one-line DatasetFormatError for a read that failed mid-run: the damaged shard (found by
        scanning the shards now, only on error) and how to go on."""
        config = self.config
        found = data.damaged_shard(config.data, ["train", self.val_split])
        if found is None:
            found = f"reading {config.data}: {err.message.strip().splitlines()[0]}"
        latest = self.manager.latest_checkpoint
        if latest is None:
            then = "no checkpoint was saved yet: start the run again"
        else:
            then = (f"then --resume --output {config.output} continues from the last checkpoint "
                    f"(step {latest.rsplit('-', 1)[-1]})")
        return tfrecord.DatasetFormatError(f"{found}; {then}")

    def _length_text(self):
        config = self.config
        if config.time_budget:
            return f"time budget {config.time_budget:g} min"
        return f"{self.total_steps} steps"

    def _loop(self, train_steps, eval_step, iterator, history, writer, budget):
        config = self.config
        step = int(self.step.numpy())
        progress = keras.utils.Progbar(self.total_steps or 1, stateful_metrics=["loss", "train_miou"],
                                       verbose=1 if config.progress else 0)
        stopped_early, measured_compile = False, False
        self._validation_count = None
        # Where this process's wall time goes, for timing.json and the run report.
        self.timing = {"start_up_seconds": time.time() - self.started_at, "step_seconds": 0.0,
                       "validation_seconds": 0.0, "checkpoint_seconds": 0.0, "validations": 0, "steps": 0}
        losses_since, steps_since, interval_started = [], 0, time.perf_counter()
        self.train_iou.reset_state()
        while self.total_steps is None or step < self.total_steps:
            # The first call compiles: a short one, so that a budget run measures its step soon.
            limit = step + (config.steps_per_call if measured_compile else min(2, config.steps_per_call))
            if budget is not None and measured_compile:
                # A budget run re-plans between calls only: a call must not commit to more time than
                # the planner's window (its first measured one, to more than two steps) whatever the
                # step costs (10 steps of 13 s ran 2 minutes past a budget's plan).
                fit = int(budget.window // budget.seconds_per_step) if budget.measured else 2
                limit = min(limit, step + max(1, fit))
            if self.total_steps is not None:
                limit = min(limit, self.total_steps, self._next_validation(step), self._next_checkpoint(step))
            n = max(1, limit - step)
            chunk_started = time.perf_counter()
            loss = float(train_steps(iterator, tf.constant(n)))
            seconds = time.perf_counter() - chunk_started
            self.timing["step_seconds"] += seconds
            self.timing["steps"] += n
            step += n
            losses_since.append(loss * n)
            steps_since += n
            if budget is not None and measured_compile:  # the first chunk holds the compilation
                budget.record_steps(n, seconds)
                self._replan(budget, step)
                progress.target = self.total_steps
            measured_compile = True
            if self.total_steps is None:
                continue
            # Whether this chunk reached a validation or checkpoint point (of the plan as it now stands).
            validate_at, checkpoint_at = self._next_validation(step - n), self._next_checkpoint(step - n)
            progress.update(min(step, progress.target),
                            [("loss", loss), ("train_miou", float(self.train_iou.result()))])
            final = step >= self.total_steps
            events_started = time.perf_counter()
            if final or step >= validate_at:
                self._validate_and_log(eval_step, step, sum(losses_since) / steps_since,
                                       time.perf_counter() - interval_started, history, writer, budget)
                self.timing["validation_seconds"] += time.perf_counter() - events_started
                self.timing["validations"] += 1
                self._validation_count = self._validations_done(step) + 1
                losses_since, steps_since, interval_started = [], 0, time.perf_counter()
                self.train_iou.reset_state()
                if config.patience and int(self.wait.numpy()) >= config.patience and not final:
                    self.log(f"early stop: no val mIoU improvement in {config.patience} validations")
                    stopped_early = True
            if final or stopped_early or step >= checkpoint_at:
                self._save_checkpoint()
            if budget is not None and step >= validate_at:
                # A validation with its files, summaries and checkpoint; the first one also traces
                # the evaluation step and is not a measure of the others.
                if self._validated:
                    budget.record_validation(time.perf_counter() - events_started)
                else:
                    budget.record_first_validation(time.perf_counter() - events_started)
                self._validated = True
                if not final and budget.plan(step, 0, self._validation_estimate(budget)) <= step:
                    # Not one more step fits before a final validation: the one just done is the
                    # last (with --val-every, a validation can fall right before the planned end).
                    self.log(f"time budget: step {step}'s validation is the last; the run ends here")
                    self.total_steps = step
                    break
            if stopped_early:
                break
        summary = dict(self._best_summary())
        summary["stopped_early"] = stopped_early
        summary["steps"] = step
        return summary

    # ----------------------------------------------------------------------- cadence

    def _next_validation(self, step):
        """The step of the first validation after `step` (the end of the run validates too)."""
        config = self.config
        if config.val_every or config.epochs:
            interval = config.val_every or self.steps_per_epoch
            return (step // interval + 1) * interval
        # --iters / --time-budget: DEFAULT_VALIDATIONS evenly spread over the run; a budget run's
        # end moves as it re-plans, and so do the points still to come (counted, so that a moved
        # point never brings the next validation right after the last one).
        done = self._validations_done(step)
        return max(step + 1, math.ceil((done + 1) * self.total_steps / DEFAULT_VALIDATIONS))

    def _validations_done(self, step):
        if self._validation_count is None:  # at the start, or resumed at `step`
            self._validation_count = step * DEFAULT_VALIDATIONS // max(self.total_steps, 1)
        return self._validation_count

    def _next_checkpoint(self, step):
        every = self.config.checkpoint_every
        return (step // every + 1) * every if every else self._next_validation(step)

    def _validations_left(self, step, total):
        """Validations after `step` and before the end of a run of `total` steps."""
        config = self.config
        if config.val_every or config.epochs:
            interval = config.val_every or self.steps_per_epoch
            return max(0, (total - 1) // interval - step // interval)
        return max(0, DEFAULT_VALIDATIONS - 1 - (self._validation_count or 0))

    def _replan(self, budget, step):
        """A time-budget run: the total step count that ends on time, and the schedule fitted to it."""
        estimate = self._validation_estimate(budget)
        guess = self.total_steps or budget.plan(step, DEFAULT_VALIDATIONS - 1, estimate)
        total = max(step + 1, budget.plan(step, self._validations_left(step, max(guess, step + 1)), estimate))
        # Re-fit the schedule only for a real change, not for every few milliseconds of noise.
        if self.total_steps is None or abs(total - self.total_steps) > max(1, 0.002 * self.total_steps):
            self.total_steps = total
            before = self.schedule.warmup_steps
            capped = self.schedule.cap_warmup(step, total)
            if capped is not None:
                self.log(f"time budget: warm-up of {before} steps shortened to {capped} (half of the "
                         f"{total} steps planned, or the step reached)")
            self.schedule.retarget(step, total)

    def _validation_estimate(self, budget):
        """Before the first validation: the val split's forward passes at a third of a training step's cost."""
        val_examples = int(self.info["splits"][self.val_split]["num_examples"])
        return val_examples / self.examples_per_step * budget.seconds_per_step / 3

    # ----------------------------------------------------------------------- validation and files

    def _validate_and_log(self, eval_step, step, loss, seconds, history, writer, budget):
        config = self.config
        self.val_iou.reset_state()
        if self.inference_model is not self.model:
            self.inference_model.set_weights(self.model.get_weights())
        for batch in self.val_data:
            eval_step(batch)
        result = metrics.summarize_confusion(self.val_iou.confusion_matrix(), self.class_names,
                                             self.info.get("label_space"))
        epoch = step / self.steps_per_epoch
        row = {"step": step, "epoch": round(epoch, 3), "loss": loss, "train_miou": float(self.train_iou.result()),
               "val_miou": result["miou"], "val_pixel_accuracy": result["pixel_accuracy"],
               "val_mean_dice": result["mean_dice"], "learning_rate": float(self.schedule(step)),
               "seconds": seconds}
        history.append(row)
        self._summaries(writer, step, row, result)
        improved = result["miou"] > float(self.best.numpy())
        line = (f"step {step}/{self.total_steps} (epoch {epoch:.2f}): loss {loss:.4f}  train mIoU "
                f"{row['train_miou']:.4f}  val mIoU {result['miou']:.4f}  pixel acc {result['pixel_accuracy']:.4f}  "
                f"lr {row['learning_rate']:.2e}  ({seconds:.0f} s)")
        if "category_miou" in result:
            line += f"  category mIoU {result['category_miou']:.4f}"
        if budget is not None:
            minutes, seconds = divmod(int(self._spent_before + time.time() - self.started_at), 60)
            line += f"  [{minutes}:{seconds:02d} of {config.time_budget:g} min]"
        if improved:
            self.best.assign(result["miou"])
            self.wait.assign(0)
            line += "  * best"
            if self.chief:
                saved = time.perf_counter()
                save_model_atomically(self.model, self.run_dir.best_model)
                if budget is not None and self._validated:  # the first save also traces the model
                    budget.record_save(time.perf_counter() - saved)
                write_best(self.run_dir, step, epoch, result,
                           metrics.format_table(result["confusion_matrix"], self.class_names))
        else:
            self.wait.assign_add(1)
            if config.schedule == "plateau" and int(self.wait.numpy()) % config.plateau_patience == 0:
                self.schedule.cut(config.plateau_factor)
                line += f"  (no improvement in {int(self.wait.numpy())} validations: lr x{config.plateau_factor})"
        self.log(line)

    def _save_checkpoint(self):
        # Seconds this run has spent, across resumes: before this process, and in it.
        self.elapsed.assign(self._spent_before + time.time() - self.started_at)
        saved = time.perf_counter()
        self.manager.save(checkpoint_number=int(self.step.numpy()))
        if hasattr(self, "timing"):
            self.timing["checkpoint_seconds"] += time.perf_counter() - saved
            self._write_timing()
        if isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # Lets a person (and the multi-worker test) see that a resume restores this state.
            self.log(f"checkpoint step {int(self.step.numpy())} weights fingerprint {weights_fingerprint(self.model)}")

    def _check_same_hardware(self):
        """A resumed run continues only with the examples per step and precision it was trained with.

        Its input position is `step x examples_per_step` and its learning rate may be scaled to the
        batch: on another replica count it would replay or skip data and change its rate silently.
        Its checkpoint holds the optimizer of its precision (mixed_float16's loss scale): across
        precisions the restore fails inside TensorFlow. Both are refused here, in one line.
        """
        config, recorded = self.config, self.config.resolved
        examples, replicas = recorded.get("examples_per_step"), recorded.get("replicas")
        if examples is not None and examples != self.examples_per_step:
            raise ValueError(
                f"--resume: {config.output} was trained on {replicas} replica(s), {examples} examples a step; "
                f"here {self.replicas} replica(s) make {self.examples_per_step}, so its input position and "
                f"learning rate would not continue: resume where {replicas} device(s) are used, or start a "
                f"new run with --init-from {config.output}")
        precision = recorded.get("precision")
        if precision and precision != self.precision:
            raise ValueError(
                f"--resume: {config.output} was trained in {precision}, and --precision {config.precision} gives "
                f"{self.precision} here; its optimizer state does not restore across precisions: resume "
                f"with --precision {precision}, or start a new run with --init-from {config.output}")

    def _write_config(self):
        config = self.config
        if not self.chief:
            return
        config.resolved = {"precision": self.precision, "precision_reason": self.precision_reason,
                           "precision_seconds_per_step": self.precision_measured,
                           "strategy": distribute.strategy_name(self.strategy),
                           "replicas": self.replicas, "global_batch_size": self.global_batch,
                           "examples_per_step": self.examples_per_step, "steps_per_epoch": self.steps_per_epoch,
                           "learning_rate": self.learning_rate, "total_steps": self.total_steps,
                           "warmup_steps": self.schedule.warmup_steps}
        write_json_atomically(self.run_dir.config, config.to_dict())
        shutil.copyfile(os.path.join(config.data, tfrecord.DATASET_INFO_NAME), self.run_dir.dataset_info)

    def _finish(self):
        config, paths = self.config, self.run_dir
        self._finish_started = time.time()
        if self.chief and config.time_budget:
            # The step count the budget came to, so that the run can be repeated with --iters.
            config.resolved["total_steps"] = int(self.step.numpy())
            write_json_atomically(paths.config, config.to_dict())
        # Every worker's replicas must end with the same weights; this line lets a person (and the
        # multi-worker test) compare them across machines.
        worker = ""
        if isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            resolver = self.strategy.cluster_resolver
            worker = f" ({resolver.task_type} {resolver.task_id})"
        self.log(f"weights fingerprint {weights_fingerprint(self.model)}{worker}")
        if self.chief:
            save_model_atomically(self.model, paths.last_model)
            self._sample_grid()
            if config.export and os.path.exists(paths.best_model):
                from keras_seg.export import export_saved_model

                export_saved_model(paths.root, paths.saved_model, version=1, overwrite=True, log=self.log)
            self._write_report()

    def _write_timing(self):
        if self.chief:
            write_json_atomically(os.path.join(self.run_dir.root, "timing.json"), self.timing)

    def _write_report(self):
        """RUN/report.html; a report that fails says why in one line and leaves the run as it is."""
        if hasattr(self, "timing"):
            self.timing["final_phase_seconds"] = time.time() - self._finish_started
            self._write_timing()
        try:
            from keras_seg.report import write_run_report  # draws with matplotlib: imported only here

            self.log(f"report: {write_run_report(self.run_dir.root)}")
        except Exception as err:  # noqa: BLE001 - the models and checkpoints are written: the run stands
            why = (str(err).strip().splitlines() or [""])[0]
            self.log(f"report: not written ({type(err).__name__}: {why}); rebuild it with "
                     f"python -m keras_seg.report {self.run_dir.root}")

    def _best_summary(self):
        if os.path.exists(self.run_dir.best_metrics):
            from keras_seg.run_dir import read_json

            return read_json(self.run_dir.best_metrics)
        return {}

    def _init_from(self, run):
        path = run if run.endswith(".keras") else os.path.join(run, "best.keras")
        if not os.path.exists(path):
            raise ValueError(f"--init-from: {path} does not exist")
        source = keras.saving.load_model(path, compile=False)
        self.model.set_weights(source.get_weights())
        self.log(f"initialized the weights from {path}")

    def _summaries(self, writer, step, row, result):
        with writer.as_default(step=step):
            for key in ("loss", "train_miou", "val_miou", "val_pixel_accuracy", "val_mean_dice", "learning_rate"):
                tf.summary.scalar(key, row[key])
            for name, iou in zip(self.class_names, result["per_class_iou"]):
                if not np.isnan(iou):
                    tf.summary.scalar(f"val_iou/{name.replace(' ', '_')}", iou)
            if "category_miou" in result:
                tf.summary.scalar("val_category_miou", result["category_miou"])
            tf.summary.image("val_confusion_matrix",
                             visualize.confusion_matrix_image(result["confusion_matrix"], self.class_names)[None],
                             step=step, description="rows: ground truth, % of its pixels")
            tf.summary.image("val_samples", self._predictions_grid(4)[None], step=step,
                             description="image | ground truth | prediction")

    def _sample_batch(self, count=6):
        """The first `count` validation examples, read once, for the pictures of every validation."""
        if not hasattr(self, "_samples"):
            batch = next(iter(data.build_dataset(
                self.config.data, self.val_split, training=False, batch_size=count,
                image_size=tuple(self.config.image_size), resize_mode=self.config.resize_mode,
                base_scale=self.config.base_scale)))
            self._samples = (batch[0].numpy(), batch[1].numpy())
        return self._samples

    def _predictions_grid(self, count):
        images, masks = (array[:count] for array in self._sample_batch())
        logits = self.model(images, training=False)
        predictions = np.argmax(keras.ops.convert_to_numpy(logits), axis=-1)
        return visualize.prediction_grid(images, masks, predictions, self.info["class_colors"])

    def _sample_grid(self):
        if os.path.exists(self.run_dir.best_model):
            best = keras.saving.load_model(self.run_dir.best_model, compile=False)
            self.model.set_weights(best.get_weights())
        visualize.save_png(self.run_dir.samples, self._predictions_grid(6))
