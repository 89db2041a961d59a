"""`Trainer`: one run, from its config to its run directory, under any `tf.distribute` strategy.

The run is counted in steps (one optimizer update: `accumulate` batches). Its length is given as
steps, epochs, or a time budget (`cadence.BudgetPlanner`), and the learning-rate schedule
(`schedules`) ends with it. The checkpoint holds everything that decides what comes next: model,
optimizer, the step counter (which also seeds augmentation and positions the input stream,
`data.build_dataset(start_example=...)`), the schedule's variables, the best metric, the
early-stopping and plateau counters and the time already spent. So a run resumed from the
checkpoint of step k trains on the same batches, with the same augmentation, as the run that was
interrupted would have.

The pieces are built by `setup` (state, streams), `step` (the compiled steps), `loop` (when to
train, validate and checkpoint) and `outputs` (the files); the trainer holds them together and is
the loop's hooks.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time

import keras
import tensorflow as tf

from keras_seg import distribute, metrics
from keras_seg.config import TrainConfig
from keras_seg.run_dir import History, RunDir, weights_fingerprint
from keras_seg.training import cadence, loop, outputs, precision_probe, setup
from keras_seg.training.step import make_eval_step, make_train_steps

# The worst and best val images the run report shows.
REPORT_IMAGES = 4

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


class Trainer(loop.Hooks):
    """Trains one run; `run()` returns the best validation metrics.

    Args:
        config: a validated `TrainConfig` (with `output` and `data` set).
        log: where progress lines go.
        started_at: the wall-clock time the run's time budget counts from (default: process start).
    """

    def __init__(self, config: TrainConfig, *, log=print, started_at=None):
        self.config = config
        self.log = log
        self.started_at = cadence.process_start_time() if started_at is None else started_at
        self.strategy = distribute.choose_strategy(config.strategy, config.devices)
        self.precision, self.precision_reason = distribute.choose_precision(config.precision)
        self.precision_measured = {}  # seconds a step per precision, where `auto` timed them
        if self.precision != distribute.MEASURE:  # else decided when the run starts (`run`)
            keras.mixed_precision.set_dtype_policy(self.precision)
        self.chief = distribute.is_chief(self.strategy)
        # Non-chief workers write what they must (checkpoints are collective) to scratch space.
        self.run_dir = RunDir(config.output if self.chief else tempfile.mkdtemp(prefix="keras_seg_worker_"))
        self.shape = setup.describe_run(config, self.strategy.num_replicas_in_sync)
        self.total_steps = setup.fixed_total(config, self.shape)
        self.state = None
        self.timing = None
        self._final_scores, self._best_step = None, None

    # The state's parts under the names a reader of a run looks for.
    model = property(lambda self: self.state.model)
    train_model = property(lambda self: self.state.train_model)
    schedule = property(lambda self: self.state.schedule)
    step = property(lambda self: self.state.step)
    aux_weight = property(lambda self: self.state.aux_weight)
    encoder_layers = property(lambda self: self.state.encoder_layers)
    warmup_steps = property(lambda self: self.state.schedule.warmup_steps)

    # ----------------------------------------------------------------------- the run

    def run(self):
        config, shape = self.config, self.shape
        os.makedirs(self.run_dir.root, exist_ok=True)
        if self.precision == distribute.MEASURE:
            self.precision, self.precision_reason, self.precision_measured = precision_probe.choose(self, log=self.log)
            keras.mixed_precision.set_dtype_policy(self.precision)
        if config.resume:
            setup.check_resume_shape(config, shape, self.precision)
        state = self.build()
        if config.resume:
            self._restore()
        elif config.init_from:
            self.load_initial_weights(config.init_from)
        start_step = int(state.step.numpy())
        planned = int(state.schedule.total_steps.numpy())
        if config.resume and self.total_steps is not None and (planned != self.total_steps
                                                               or state.schedule.counts_time):
            # A new length given with --resume: the decay now ends there, from the rate reached.
            state.schedule.retarget(start_step, self.total_steps)
            was = "the time budget's end" if planned == setup.UNPLANNED else str(planned)
            self.log(f"the schedule now ends at step {self.total_steps} (was {was})")
        self._spent_before = float(state.elapsed.numpy())  # by the processes this run was resumed from
        planner = self._planner() if config.time_budget else None
        self._write_config()
        # A progressive run starts at its first size until the schedule's progress reaches its share.
        self._low_size = bool(config.progressive) and float(state.schedule.progress(start_step)) < config.progressive
        try:
            self.datasets = setup.build_datasets(config, shape, self.strategy, start_step, log=self.log,
                                                 low=self._low_size)
        except (tf.errors.DataLossError, tf.errors.InternalError) as err:
            raise self._damaged_data(err) from None
        self.train_steps = make_train_steps(state, config, self.strategy, log=self.log)
        self.eval_step = make_eval_step(state, config, self.strategy, shape.num_classes)
        self.writer = tf.summary.create_file_writer(self.run_dir.logs) if self.chief else \
            tf.summary.create_noop_writer()
        self.history = History(self.run_dir.history, keep_until_step=start_step if config.resume else 0)
        self.pictures = outputs.SamplePictures(config, shape.val_split, shape.info["class_colors"])
        self._log_start()
        self.iterator = iter(self.datasets.train)
        # With a file cache it goes at the end of the loop, as before: its deletion is when TensorFlow
        # removes a cache it has only partly written.
        keep_until_exit(self.iterator if config.cache in (None, "memory") else None)
        self._bar = keras.utils.Progbar(self.total_steps or 1, stateful_metrics=["loss", "train_miou"],
                                        verbose=1 if config.progress else 0)
        self._since = {"loss": 0.0, "steps": 0, "started": time.perf_counter()}
        state.train_iou.reset_state()
        self.timing = loop.new_timing(time.time() - self.started_at)
        checkpoints = None
        if self.total_steps is not None:
            checkpoints = cadence.StepCadence(self.total_steps, config.val_every, config.checkpoint_every,
                                              shape.steps_per_epoch, per_epoch=bool(config.epochs))
        elif config.checkpoint_every:
            checkpoints = cadence.StepCadence(setup.UNPLANNED, checkpoint_every=config.checkpoint_every)
        try:
            result = loop.run_loop(self, start_step, config.steps_per_call, cadence=checkpoints, planner=planner,
                                   total_steps=self.total_steps, timing=self.timing)
        except (tf.errors.DataLossError, tf.errors.InternalError) as err:  # a shard or cache file damaged on disk
            raise self._damaged_data(err) from None
        except KeyboardInterrupt:
            self.checkpoint(int(state.step.numpy()))
            raise
        finally:
            del self.iterator
            self.history.close()
            self.writer.close()
        last_step_at = time.time()
        if planner is not None:
            self.timing["planned_final_phase_seconds"] = planner.final_seconds()
            if planner.trace_seconds is not None:
                self.timing["evaluation_trace_seconds"] = planner.trace_seconds
        self._finish(planner)
        if planner is not None:
            self.log(f"time budget {config.time_budget:g} min: {result.step} steps; the last step ended "
                     f"{(last_step_at - self.started_at) / 60:.2f} min after the start, the run "
                     f"{(time.time() - self.started_at) / 60:.2f} min (this process; planned final phase "
                     f"{planner.final_seconds():.0f} s, took {time.time() - last_step_at:.0f} s)")
        summary = dict(outputs.best_summary(self.run_dir))
        summary["stopped_early"] = result.stopped_early
        summary["steps"] = result.step
        return summary

    def build(self):
        """The run's state (`setup.build_state`) and its checkpoint manager, from the config's seed."""
        self.state = setup.build_state(self.config, self.shape, self.strategy, self.precision, self.total_steps,
                                       log=self.log)
        self.manager = tf.train.CheckpointManager(self.state.checkpoint, self.run_dir.checkpoints, max_to_keep=2,
                                                  step_counter=self.state.step)
        return self.state

    def _planner(self):
        """A time-budget run's planner: what its interrupted processes spent counts against the budget,
        this process's start-up too."""
        config, shape, schedule = self.config, self.shape, self.state.schedule
        seconds = 60 * config.time_budget
        remaining = seconds - self._spent_before
        val_batches = -(-shape.val_examples // shape.val_batch)
        return cadence.BudgetPlanner(
            self.started_at + remaining, remaining, val_examples=shape.val_examples,
            examples_per_step=shape.examples_per_step, val_batches=val_batches, margin=0.01 * seconds,
            export=config.export, report=True, validation_share=config.val_share, val_every=config.val_every,
            progress=float(schedule.progress(self.state.step)) if schedule.counts_time else 0.0)

    def _log_start(self):
        config, shape = self.config, self.shape
        length = f"time budget {config.time_budget:g} min" if config.time_budget else f"{self.total_steps} steps"
        self.log(f"training {self.model.name}: {self.model.count_params():,} parameters, {self.precision}, "
                 f"strategy {distribute.strategy_name(self.strategy)} x{shape.replicas} replicas, global batch "
                 f"{shape.global_batch}" + (f" x{config.accumulate} accumulated" if config.accumulate > 1 else "")
                 + f", {shape.steps_per_epoch} steps/epoch, {length}")
        self.log(f"precision {self.precision}: {self.precision_reason}")
        if config.progressive:
            height, width = setup.progressive_size(config)
            self.log(f"progressive: {height}x{width} until the schedule's progress reaches {config.progressive:g}, "
                     f"then {config.image_size[0]}x{config.image_size[1]}")
        onednn = distribute.onednn_state()
        self.log(f"oneDNN {'on' if onednn['enabled'] else 'off'} ({onednn['why']})")
        if config.scale_lr_to_batch:
            self.log(f"learning rate scaled to the batch: {config.learning_rate:g} x {shape.examples_per_step}/"
                     f"{config.scale_lr_to_batch} = {shape.learning_rate:g}")

    # ----------------------------------------------------------------------- the loop's hooks

    def train(self, steps):
        loss = float(self.train_steps(self.iterator, tf.constant(steps)))
        self._since["loss"] += loss * steps
        self._since["steps"] += steps
        return loss

    def change_input(self, step):
        """A progressive run's switch to its full size, once the schedule's progress reaches its share."""
        config = self.config
        if not self._low_size or float(self.state.schedule.progress(step)) < config.progressive:
            return False
        try:
            train = setup.build_training_stream(config, self.shape, self.strategy, step)
        except (tf.errors.DataLossError, tf.errors.InternalError) as err:
            raise self._damaged_data(err) from None
        self.datasets.train, self.iterator, self._low_size = train, iter(train), False
        if config.cache in (None, "memory"):  # both sizes' iterators kept, as the run's one is (keep_until_exit)
            _KEPT_ITERATORS.append(self.iterator)
        height, width = config.image_size
        self.log(f"progressive: from step {step} (progress {float(self.state.schedule.progress(step)):.2f} of "
                 f"{config.progressive:g}) at {height}x{width}")
        return True

    def set_segment(self, step, progress, per_step, cap):
        self.state.schedule.set_segment(step, progress, per_step, cap)

    def cap_warmup(self, step, planned_steps):
        before = self.state.schedule.warmup_steps
        if self.state.schedule.cap_warmup(step, planned_steps) is not None:
            self.log(f"time budget: warm-up of {before} steps shortened to {self.state.schedule.warmup_steps} "
                     f"(half of the {planned_steps} steps planned, or the step reached)")

    def progress(self, step, target, loss):
        self._bar.target = max(target, 1)
        self._bar.update(min(step, self._bar.target),
                         [("loss", loss), ("train_miou", float(self.state.train_iou.result()))])

    def probe_validation(self, batches):
        seconds = []
        if self.state.inference_model is not self.state.model:
            self.state.inference_model.set_weights(self.state.model.get_weights())
        for batch in itertools.islice(self.datasets.val, batches):
            started = time.perf_counter()
            self.eval_step(batch)
            self.state.val_iou.confusion_matrix()  # waits for the batch's result
            seconds.append(time.perf_counter() - started)
        self.state.val_iou.reset_state()
        return seconds

    def validate(self, step, final, batches):
        config, shape, state = self.config, self.shape, self.state
        since = self._since
        loss, seconds = since["loss"] / max(since["steps"], 1), time.perf_counter() - since["started"]
        if state.inference_model is not state.model:
            state.inference_model.set_weights(state.model.get_weights())
        if final and config.time_budget and self.chief:
            # Image by image, so that the report takes this scoring rather than scoring the split again.
            result, scores = outputs.score_images(self.state.inference_model, config, shape, batches,
                                                  REPORT_IMAGES)
            self._final_scores = (result, scores)
        else:
            state.val_iou.reset_state()
            for batch in itertools.islice(self.datasets.val, batches):
                self.eval_step(batch)
            result = metrics.summarize_confusion(state.val_iou.confusion_matrix(), shape.class_names,
                                                 shape.info.get("label_space"))
        epoch = step / shape.steps_per_epoch
        row = {"step": step, "epoch": round(epoch, 3), "loss": loss, "train_miou": float(state.train_iou.result()),
               "val_miou": result["miou"], "val_pixel_accuracy": result["pixel_accuracy"],
               "val_mean_dice": result["mean_dice"], "learning_rate": float(state.schedule(step)), "seconds": seconds}
        self.history.append(row)
        outputs.write_summaries(self.writer, step, row, result, shape.class_names, self.pictures, state.model)
        improved = result["miou"] > float(state.best.numpy())
        total = self.total_steps if self.total_steps is not None else "~" + str(self._bar.target)
        line = (f"step {step}/{total} (epoch {epoch:.2f}): loss {loss:.4f}  train mIoU "
                f"{row['train_miou']:.4f}  val mIoU {result['miou']:.4f}  pixel acc {result['pixel_accuracy']:.4f}  "
                f"lr {row['learning_rate']:.2e}  ({seconds:.0f} s)")
        if "category_miou" in result:
            line += f"  category mIoU {result['category_miou']:.4f}"
        if batches is not None:
            line += f"  (first {batches} val batches)"
        if config.time_budget:
            minutes, secs = divmod(int(self._spent_before + time.time() - self.started_at), 60)
            line += f"  [{minutes}:{secs:02d} of {config.time_budget:g} min]"
        if improved:
            state.best.assign(result["miou"])
            state.wait.assign(0)
            line += "  * best"
            self._best = (step, epoch, result)
            self._best_step = step
        else:
            state.wait.assign_add(1)
            if config.schedule == "plateau" and int(state.wait.numpy()) % config.plateau_patience == 0:
                state.schedule.cut(config.plateau_factor)
                line += f"  (no improvement in {int(state.wait.numpy())} validations: lr x{config.plateau_factor})"
        if improved:
            self._best_line = line  # said once the best model is saved
        else:
            self.log(line)
        since.update(loss=0.0, steps=0, started=time.perf_counter())
        state.train_iou.reset_state()
        return improved

    def save_best(self, step):
        if self.chief:
            step, epoch, result = self._best
            outputs.save_best(self.run_dir, self.state.model, step, epoch, result, self.shape.class_names)
        self.log(self._best_line)

    def should_stop(self, final):
        patience = self.config.patience
        if patience and int(self.state.wait.numpy()) >= patience and not final:
            self.log(f"early stop: no val mIoU improvement in {patience} validations")
            return True
        return False

    def checkpoint(self, step):
        # Seconds this run has spent, across resumes: before this process, and in it.
        self.state.elapsed.assign(self._spent_before + time.time() - self.started_at)
        self.manager.save(checkpoint_number=int(self.state.step.numpy()))
        if self.timing is not None and self.chief:
            outputs.write_timing(self.run_dir, self.timing)
        if isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # Lets a person (and the multi-worker test) see that a resume restores this state.
            self.log(f"checkpoint step {int(self.state.step.numpy())} weights fingerprint "
                     f"{weights_fingerprint(self.model)}")

    # ----------------------------------------------------------------------- start and end

    def _restore(self):
        # Every worker restores the chief's checkpoint (the run directory must be on storage that
        # every worker sees); the others write theirs to scratch space.
        config = self.config
        checkpoints = os.path.join(config.output, "checkpoints")
        latest = tf.train.latest_checkpoint(checkpoints)
        if latest is None:
            raise ValueError(f"--resume: no checkpoint in {checkpoints}")
        try:
            # Every variable of the model and optimizer must come from the checkpoint: one that does
            # not (another keras-seg's layout) is an error, not a silent fresh start.
            self.state.checkpoint.restore(latest).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as err:
            why = (str(err).strip().splitlines() or [""])[0][:200]
            raise ValueError(f"--resume: {latest} does not restore into this run's model and optimizer "
                             f"({type(err).__name__}: {why}); start a new run with --init-from "
                             f"{config.output}") from None
        self.log(f"resuming {config.output} at step {int(self.state.step.numpy())} (best val mIoU so far "
                 f"{self.state.best.numpy():.4f}, weights fingerprint {weights_fingerprint(self.model)})")

    def _write_config(self):
        config, shape = self.config, self.shape
        if not self.chief:
            return
        config.resolved = {"precision": self.precision, "precision_reason": self.precision_reason,
                           "precision_seconds_per_step": self.precision_measured,
                           "strategy": distribute.strategy_name(self.strategy),
                           "replicas": shape.replicas, "global_batch_size": shape.global_batch,
                           "examples_per_step": shape.examples_per_step, "steps_per_epoch": shape.steps_per_epoch,
                           "learning_rate": shape.learning_rate, "total_steps": self.total_steps,
                           "warmup_steps": self.state.schedule.warmup_steps, "onednn": distribute.onednn_state()}
        outputs.write_config(self.run_dir, config)
        outputs.copy_dataset_info(self.run_dir, config.data)

    def _finish(self, planner):
        config = self.config
        finish_started = time.time()
        if self.chief and config.time_budget:
            # The step count the budget came to, so that the run can be repeated with --iters.
            config.resolved["total_steps"] = int(self.state.step.numpy())
            config.resolved["warmup_steps"] = self.state.schedule.warmup_steps
            if planner is not None and planner.val_batches is not None:
                config.resolved["val_batches"] = planner.val_batches
            outputs.write_config(self.run_dir, config)
        # Every worker's replicas must end with the same weights; this line lets a person (and the
        # multi-worker test) compare them across machines.
        worker = ""
        if isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            resolver = self.strategy.cluster_resolver
            worker = f" ({resolver.task_type} {resolver.task_id})"
        self.log(f"weights fingerprint {weights_fingerprint(self.model)}{worker}")
        if self.chief:
            def close_timing():
                self.timing["final_phase_seconds"] = time.time() - finish_started
                outputs.write_timing(self.run_dir, self.timing)

            # The final validation's image scores serve the report when its model is best.keras.
            final_best = self._final_scores is not None and self._best_step == int(self.state.step.numpy())
            limit = planner.val_batches * self.shape.val_batch if planner is not None and planner.val_batches else 0
            outputs.write_final_products(self.run_dir, config, self.model, self.pictures, log=self.log,
                                         timing=self.timing, before_report=close_timing,
                                         scored=self._final_scores if final_best else None, limit=limit)

    def _damaged_data(self, err):
        """A damaged read as one line; an InternalError is one only with a file cache (a truncated cache
        file raises it), else it goes on as it is."""
        if isinstance(err, tf.errors.InternalError) and self.config.cache in (None, "memory"):
            return err
        return outputs.damaged_data_error(err, self.config, self.shape.val_split, self.manager.latest_checkpoint)

    def load_initial_weights(self, run):
        """--init-from: the model takes another run's best weights (or a .keras file's)."""
        path = run if run.endswith(".keras") else os.path.join(run, "best.keras")
        if not os.path.exists(path):
            raise ValueError(f"--init-from: {path} does not exist")
        source = keras.saving.load_model(path, compile=False)
        self.model.set_weights(source.get_weights())
        self.log(f"initialized the weights from {path}")
