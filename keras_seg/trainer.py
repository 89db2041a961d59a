"""The training loop, one for every `tf.distribute` strategy.

Why a custom loop rather than `Model.fit`: `fit` fails under MultiWorkerMirroredStrategy with
Keras 3 (keras-team/keras#20585: "Attempt to convert a value (PerReplica...) to a Tensor"),
while a step run through `strategy.run` over `distribute_datasets_from_function` trains under
the default, Mirrored, MultiWorkerMirrored and TPU strategies alike. One loop for all of them is
simpler to trust than `fit` for some and a loop for others, and it lets augmentation run inside
the compiled step, on the accelerator.

State that survives an interruption (`--resume`) lives in a `tf.train.CheckpointManager`
checkpoint written after every epoch: model, optimizer (with its step counter, which also seeds
augmentation), the epoch, the best validation mIoU so far and the early-stopping counter. The best
model is also saved as `best.keras`, written to a temporary file and renamed, so it is never a
half-written file.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from keras_seg import augment, data, distribute, losses, metrics, tfrecord, visualize
from keras_seg.files import publish, temp_path_beside, write_json_atomically, write_text_atomically
from keras_seg.models import presets

LOG_COLUMNS = ("epoch", "loss", "train_miou", "val_miou", "val_pixel_accuracy", "val_mean_dice", "learning_rate",
               "seconds")


class RunDir:
    """Paths of a run directory (see the README's "A run directory")."""

    def __init__(self, root):
        self.root = root
        self.config = os.path.join(root, "config.json")
        self.dataset_info = os.path.join(root, "dataset_info.json")
        self.history = os.path.join(root, "history.csv")
        self.logs = os.path.join(root, "logs")
        self.checkpoints = os.path.join(root, "checkpoints")
        self.best_model = os.path.join(root, "best.keras")
        self.last_model = os.path.join(root, "last.keras")
        self.best_table = os.path.join(root, "best_per_class_iou.txt")
        self.best_metrics = os.path.join(root, "best_metrics.json")
        self.samples = os.path.join(root, "samples.png")
        self.saved_model = os.path.join(root, "saved_model")


def save_model_atomically(model, path):
    """`model.save` to a temporary file beside `path`, then rename: `path` is never half-written."""
    tmp = temp_path_beside(path, suffix=".keras")  # Keras wants the .keras suffix
    try:
        model.save(tmp)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def build_optimizer(config, steps_per_epoch):
    """AdamW / Adam with the configured schedule (the plateau schedule is applied by the trainer) and clipping."""
    lr = config["learning_rate"]
    total = max(1, config["epochs"] * steps_per_epoch)
    warmup = int(config["warmup_epochs"] * steps_per_epoch)
    schedule = config["schedule"]
    if schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=lr if warmup == 0 else lr * 0.01, decay_steps=max(1, total - warmup),
            alpha=0.01, warmup_target=lr if warmup else None, warmup_steps=warmup,
        )
    elif schedule == "poly":
        lr = keras.optimizers.schedules.PolynomialDecay(lr, decay_steps=total, end_learning_rate=lr * 0.01,
                                                        power=0.9)
    clip = {"global_clipnorm": config["clipnorm"]} if config["clipnorm"] else {}
    if config["optimizer"] == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate=lr, weight_decay=config["weight_decay"], **clip)
    else:
        optimizer = keras.optimizers.Adam(learning_rate=lr, **clip)
    return optimizer


def current_learning_rate(optimizer):
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    lr = inner.learning_rate
    return float(lr(inner.iterations) if callable(lr) else lr.numpy() if hasattr(lr, "numpy") else lr)


class Trainer:
    """Trains one run; `run()` returns the best validation metrics."""

    def __init__(self, config, *, log=print):
        self.config = config
        self.log = log
        self.strategy = distribute.choose_strategy(config["strategy"])
        on_gpu = bool(tf.config.list_logical_devices("GPU"))
        self.precision = distribute.choose_precision(config["precision"], on_gpu)
        keras.mixed_precision.set_dtype_policy(self.precision)
        self.chief = distribute.is_chief(self.strategy)
        # Non-chief workers write what they must (checkpoints are collective) to scratch space.
        self.run_dir = RunDir(config["output"] if self.chief else tempfile.mkdtemp(prefix="keras_seg_worker_"))
        self.info = tfrecord.load_dataset_info(config["data"])
        self.num_classes = int(self.info["num_classes"])
        self.class_names = list(self.info["class_names"])
        self.replicas = self.strategy.num_replicas_in_sync
        self.global_batch = config["batch_size"] * self.replicas
        train_examples = int(self.info["splits"]["train"]["num_examples"])
        self.steps_per_epoch = max(1, train_examples // self.global_batch)
        if config["steps_per_epoch"]:
            self.steps_per_epoch = config["steps_per_epoch"]

    # ----------------------------------------------------------------------- set-up

    def _build(self):
        config = self.config
        keras.utils.set_random_seed(int(config["seed"]))  # the same initial weights for the same seed
        with self.strategy.scope():
            entry = {"model": config["model"], "input_size": tuple(config["image_size"])}
            self.model = presets.build_model(entry, self.num_classes, weights=config.get("encoder_weights"))
            if self.replicas > 1:
                # Batch statistics over the global batch (SyncBN). Keras' BatchNormalization
                # otherwise updates its moving statistics from each replica's own batch, and the
                # workers of a multi-worker run end with different statistics.
                for layer in self.model._flatten_layers(include_self=False, recursive=True):
                    if isinstance(layer, keras.layers.BatchNormalization):
                        layer.synchronized = True
            self.optimizer = build_optimizer(config, self.steps_per_epoch)
            if self.precision == "mixed_float16":
                self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
            self.optimizer.build(self.model.trainable_variables)
            self.train_iou = metrics.MeanIoU(self.num_classes, name="train_miou")
            self.val_iou = metrics.MeanIoU(self.num_classes, name="val_miou")
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
            self.best = tf.Variable(-1.0, dtype=tf.float64, trainable=False, name="best_val_miou")
            self.wait = tf.Variable(0, dtype=tf.int64, trainable=False, name="epochs_without_improvement")
        counts = self.info["splits"]["train"].get("class_pixel_counts")
        self.loss_fn = losses.build_loss(
            config["loss"], num_classes=self.num_classes, class_weights=config["class_weights"],
            class_pixel_counts=counts,
        )
        self.augment_config = augment.AugmentConfig.from_dict(config["augment"])
        # The optimizer's state includes its learning rate, so a plateau cut survives a resume.
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, epoch=self.epoch,
                                              best=self.best, wait=self.wait)
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.run_dir.checkpoints, max_to_keep=1)

    def _datasets(self):
        config = self.config
        common = dict(image_size=tuple(config["image_size"]), resize_mode=config["resize_mode"])
        self.train_data = data.distribute_dataset(
            self.strategy, config["data"], "train", batch_size=self.global_batch, training=True, repeat=True,
            shuffle_seed=config["seed"] + int(self.epoch.numpy()), cache=config["cache"], **common,
        )
        val_batch = config["val_batch_size"] * self.replicas
        self.val_data = data.distribute_dataset(
            self.strategy, config["data"], "val", batch_size=val_batch, training=False,
            drop_remainder=False, cache=config["cache"], **common,
        )

    # ----------------------------------------------------------------------- steps

    def _make_steps(self):
        config, strategy = self.config, self.strategy
        model, optimizer, loss_fn = self.model, self.optimizer, self.loss_fn
        augment_config, seed = self.augment_config, int(config["seed"])
        scale_loss = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

        def replica_train_step(images, masks):
            # Seeded by the optimizer's step: reproducible, different every step, and resumable.
            step_seed = tf.stack([tf.constant(seed, tf.int64), tf.cast(optimizer.iterations, tf.int64)])
            replica = tf.distribute.get_replica_context()
            if replica is not None and replica.num_replicas_in_sync > 1:
                step_seed = tf.random.experimental.stateless_fold_in(
                    step_seed, tf.cast(replica.replica_id_in_sync_group, tf.int64), alg="philox")
            images, masks = augment.augment_segmentation(images, masks, step_seed, augment_config)
            with tf.GradientTape() as tape:
                logits = model(images, training=True)
                # Keras losses divide by the replica count inside a replica context, so the
                # gradients summed over replicas are those of the global-batch mean.
                loss = loss_fn(masks, logits)
                objective = optimizer.scale_loss(loss) if scale_loss else loss
            variables = model.trainable_variables
            grads = tape.gradient(objective, variables)
            optimizer.apply(grads, variables)
            self.train_iou.update_state(masks, logits)
            return loss

        def replica_eval_step(images, masks):
            self.val_iou.update_state(masks, model(images, training=False))

        if config["jit"] and self.replicas > 1:
            # A replica function compiled with XLA cannot update mirrored variables (Keras, too,
            # turns XLA off under tf.distribute).
            self.log("--jit: XLA is off with several replicas (a compiled replica step cannot update "
                     "mirrored variables)")
        elif config["jit"]:
            replica_train_step = tf.function(replica_train_step, jit_compile=True)

        @tf.function
        def train_steps(iterator, steps):
            total = tf.constant(0.0, tf.float32)
            for _ in tf.range(steps):
                per_replica = strategy.run(replica_train_step, args=next(iterator))
                total += strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
            return total / tf.cast(steps, tf.float32)

        @tf.function
        def eval_step(batch):
            strategy.run(replica_eval_step, args=batch)

        return train_steps, eval_step

    # ----------------------------------------------------------------------- the run

    def run(self):
        config, paths = self.config, self.run_dir
        os.makedirs(paths.root, exist_ok=True)
        self._build()
        start_epoch = 0
        if config["resume"]:
            latest = self.manager.latest_checkpoint
            if latest is None:
                raise ValueError(f"--resume: no checkpoint in {paths.checkpoints}")
            self.checkpoint.restore(latest).expect_partial()
            start_epoch = int(self.epoch.numpy())
            self.log(f"resuming {paths.root} after epoch {start_epoch} (best val mIoU so far "
                     f"{self.best.numpy():.4f})")
        elif config["init_from"]:
            self._init_from(config["init_from"])
        if self.chief:
            config["resolved"] = {"precision": self.precision, "strategy": distribute.strategy_name(self.strategy),
                                  "replicas": self.replicas, "global_batch_size": self.global_batch,
                                  "steps_per_epoch": self.steps_per_epoch}
            write_json_atomically(paths.config, config)
            shutil.copyfile(os.path.join(config["data"], tfrecord.DATASET_INFO_NAME), paths.dataset_info)
        self._datasets()
        train_steps, eval_step = self._make_steps()
        writer = tf.summary.create_file_writer(paths.logs) if self.chief else tf.summary.create_noop_writer()
        history = self._open_history(start_epoch)
        iterator = iter(self.train_data)
        total_steps = config["max_steps"] or None
        self.log(f"training {self.model.name}: {self.model.count_params():,} parameters, {self.precision}, "
                 f"strategy {distribute.strategy_name(self.strategy)} x{self.replicas} replicas, "
                 f"global batch {self.global_batch}, "
                 f"{self.steps_per_epoch} steps/epoch")

        stopped_early = False
        run_started = time.perf_counter()
        for epoch in range(start_epoch, config["epochs"]):
            started = time.perf_counter()
            self.train_iou.reset_state()
            steps = self.steps_per_epoch
            if total_steps is not None:
                steps = min(steps, total_steps - int(self.optimizer.iterations.numpy()))
                if steps <= 0:
                    break
            loss = self._train_epoch(train_steps, iterator, steps, epoch)
            result = self._validate(eval_step)
            seconds = time.perf_counter() - started
            improved = result["miou"] > float(self.best.numpy())
            row = {
                "epoch": epoch + 1, "loss": loss, "train_miou": float(self.train_iou.result()),
                "val_miou": result["miou"], "val_pixel_accuracy": result["pixel_accuracy"],
                "val_mean_dice": result["mean_dice"], "learning_rate": current_learning_rate(self.optimizer),
                "seconds": seconds,
            }
            history.writerow(row)
            self._history_file.flush()
            self._summaries(writer, epoch + 1, row, result)
            line = (f"epoch {epoch + 1}/{config['epochs']}: loss {loss:.4f}  train mIoU {row['train_miou']:.4f}  "
                    f"val mIoU {result['miou']:.4f}  pixel acc {result['pixel_accuracy']:.4f}  ({seconds:.0f} s)")
            if "category_miou" in result:
                line += f"  category mIoU {result['category_miou']:.4f}"
            if improved:
                self.best.assign(result["miou"])
                self.wait.assign(0)
                line += "  * best"
                if self.chief:
                    save_model_atomically(self.model, paths.best_model)
                    self._write_best(epoch + 1, result)
            else:
                self.wait.assign_add(1)
                self._maybe_reduce_lr()
            self.log(line)
            self.epoch.assign(epoch + 1)
            self.manager.save(checkpoint_number=epoch + 1)
            if config["patience"] and int(self.wait.numpy()) >= config["patience"]:
                self.log(f"early stop: no val mIoU improvement in {config['patience']} epochs")
                stopped_early = True
                break
            elapsed = time.perf_counter() - run_started
            if config["time_limit"] and epoch + 1 < config["epochs"] and elapsed + seconds > 60 * config["time_limit"]:
                self.log(f"time limit: another epoch (~{seconds:.0f} s) would end after {config['time_limit']} min")
                break
        self._history_file.close()
        writer.close()
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
            if config.get("export", True) and os.path.exists(paths.best_model):
                from keras_seg.export import export_saved_model

                export_saved_model(paths.root, paths.saved_model, version=1, overwrite=True, log=self.log)
        summary = {}
        if os.path.exists(paths.best_metrics):
            with open(paths.best_metrics) as f:
                summary = json.load(f)
        summary["stopped_early"] = stopped_early
        return summary

    def _train_epoch(self, train_steps, iterator, steps, epoch):
        progress = keras.utils.Progbar(steps, stateful_metrics=["loss", "train_miou"],
                                       verbose=1 if self.config["progress"] else 0)
        chunk = max(1, min(steps, self.config["steps_per_call"]))
        done, losses_seen = 0, []
        while done < steps:
            n = min(chunk, steps - done)
            loss = float(train_steps(iterator, tf.constant(n)))
            losses_seen.append((loss, n))
            done += n
            progress.update(done, [("loss", loss), ("train_miou", float(self.train_iou.result()))])
        return sum(loss * n for loss, n in losses_seen) / max(1, done)

    def _validate(self, eval_step):
        self.val_iou.reset_state()
        for batch in self.val_data:
            eval_step(batch)
        confusion = self.val_iou.confusion_matrix()
        return metrics.summarize_confusion(confusion, self.class_names, self.info.get("label_space"))

    def _maybe_reduce_lr(self):
        config = self.config
        if config["schedule"] != "plateau" or int(self.wait.numpy()) % config["plateau_patience"]:
            return
        inner = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        inner.learning_rate.assign(inner.learning_rate * config["plateau_factor"])
        self.log(f"val mIoU has not improved for {int(self.wait.numpy())} epochs: learning rate x"
                 f"{config['plateau_factor']} -> {current_learning_rate(self.optimizer):.2e}")

    def _init_from(self, run):
        path = run if run.endswith(".keras") else os.path.join(run, "best.keras")
        if not os.path.exists(path):
            raise ValueError(f"--init-from: {path} does not exist")
        source = keras.saving.load_model(path, compile=False)
        self.model.set_weights(source.get_weights())
        self.log(f"initialized the weights from {path}")

    def _open_history(self, start_epoch):
        path = self.run_dir.history
        rows = []
        if start_epoch and os.path.exists(path):
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= start_epoch]
        self._history_file = open(path, "w", newline="")
        history = csv.DictWriter(self._history_file, fieldnames=LOG_COLUMNS)
        history.writeheader()
        for row in rows:
            history.writerow(row)
        return history

    def _summaries(self, writer, epoch, row, result):
        with writer.as_default(step=epoch):
            for key in LOG_COLUMNS[1:]:
                tf.summary.scalar(key, row[key])
            for name, iou in zip(self.class_names, result["per_class_iou"]):
                if not np.isnan(iou):
                    tf.summary.scalar(f"val_iou/{name.replace(' ', '_')}", iou)
            if "category_miou" in result:
                tf.summary.scalar("val_category_miou", result["category_miou"])
            tf.summary.image("val_samples", self._predictions_grid(4)[None], step=epoch,
                             description="image | ground truth | prediction")

    def _sample_batch(self, count=6):
        """The first `count` validation examples, read once, for the pictures of every epoch."""
        if not hasattr(self, "_samples"):
            batch = next(iter(data.build_dataset(
                self.config["data"], "val", training=False, batch_size=count,
                image_size=tuple(self.config["image_size"]), resize_mode=self.config["resize_mode"])))
            self._samples = (batch[0].numpy(), batch[1].numpy())
        return self._samples

    def _predictions_grid(self, count):
        images, masks = (array[:count] for array in self._sample_batch())
        logits = self.model(images, training=False)
        predictions = np.argmax(keras.ops.convert_to_numpy(logits), axis=-1)
        return visualize.prediction_grid(images, masks, predictions, self.info["class_colors"])

    def _write_best(self, epoch, result):
        table = metrics.format_table(result["confusion_matrix"], self.class_names)
        write_text_atomically(self.run_dir.best_table, f"best epoch {epoch}\n{table}\n")
        summary = {k: v for k, v in result.items() if k not in ("confusion_matrix",)}
        summary = json.loads(json.dumps({"epoch": epoch, **summary}, default=_jsonable))
        write_json_atomically(self.run_dir.best_metrics, summary)

    def _sample_grid(self):
        if os.path.exists(self.run_dir.best_model):
            best = keras.saving.load_model(self.run_dir.best_model, compile=False)
            self.model.set_weights(best.get_weights())
        visualize.save_png(self.run_dir.samples, self._predictions_grid(6))


def weights_fingerprint(model) -> str:
    """First 16 hex digits of the SHA-256 of all weights."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()[:16]


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return [None if isinstance(v, float) and np.isnan(v) else v for v in value.tolist()]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(type(value).__name__)

