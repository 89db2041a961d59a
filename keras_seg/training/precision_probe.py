"""`--precision auto` on a CPU with bfloat16 instructions: time the run's own step in both precisions.

On such CPUs bfloat16 may be faster or slower than float32 depending on the model, with AMX or without
(CPU-C, an AMD EPYC with avx512_bf16: about equal for unet_small, 1.3x slower for an LR-ASPP MobileNetV3;
CPU-D, an Intel Xeon with AMX: 1.17x faster for unet_small, 1.34x slower for LR-ASPP MobileNetV3-Small;
docs/performance.md), so `distribute.choose_precision` leaves the choice to this measurement: the run's
real step (`bench.FixedBatchStep`: its model, loss, augmentation and optimizer) on one batch of its own
training data, in each precision.

A shared 2-core machine varies one step's time by +-40% (357, 214 and 469 ms for the same float32
step), enough to flip a choice made from three steps each. So the two precisions take single steps in
turn, and the measurement goes on until their medians differ by more than their spreads (half the
range of each one's steps), at least `MIN_ROUNDS` and at most `MAX_ROUNDS` rounds or `MAX_SECONDS`; when
they do not separate, float32 stays. Nothing outlives the measurement: the batch is read by a stream
without autotuning, which deletes at once (the training stream's deletion can wait a minute for
tf.data's autotuning thread, `trainer.keep_until_exit`).

It runs only where it can pay: a time budget of `MIN_RUN_MINUTES` or more, or a fixed-length run that the
first precision's steps alone put at that length or more. It is counted in a time budget because the budget
counts from the process's start. It never runs with an explicit `--precision`, nor across several workers
(each would measure alone and they could pick different precisions).
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time

import keras
import tensorflow as tf

from keras_seg import data
from keras_seg.training import setup

# A run shorter than this gains less from the faster precision than the measurement costs.
MIN_RUN_MINUTES = 10.0
# Rounds of one timed step per precision, after a two-step call that traces each.
MIN_ROUNDS, MAX_ROUNDS, MAX_SECONDS = 3, 15, 60.0
CANDIDATES = ("float32", "mixed_bfloat16")


def training_batch(trainer):
    """One batch of the run's training crops (images, masks), read by a stream that deletes at once."""
    config, shape = trainer.config, trainer.shape
    dataset = data.build_dataset(
        config.data, "train", training=True, batch_size=shape.examples_per_step, image_size=tuple(config.image_size),
        resize_mode=config.resize_mode, base_scale=config.base_scale, ratio_range=tuple(config.ratio_range),
        cat_max_ratio=config.cat_max_ratio, shuffle_seed=config.seed, shuffle_buffer=1)
    options = tf.data.Options()
    options.autotune.enabled = False
    images, masks = next(iter(dataset.with_options(options)))
    return images.numpy(), masks.numpy()


class StepSampler:
    """`sample(precision)`: seconds of one real training step of the run in `precision`, the first call
    of each after a traced two-step call. Each precision's model is built once, from the run's seed."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.batch = training_batch(trainer)
        self.steps = {}

    def sample(self, precision: str) -> float:
        from keras_seg.training.bench import FixedBatchStep

        if precision not in self.steps:
            trainer = self.trainer
            config = dataclasses.replace(trainer.config, precision=precision, cache=None, resume=False,
                                         init_from=None, encoder_weights="none")
            step = FixedBatchStep(config, *self.batch, trainer.shape.num_classes, precision=precision,
                                  strategy=trainer.strategy, info=trainer.shape.info)
            step(2)  # traces
            self.steps[precision] = step
        started = time.perf_counter()
        self.steps[precision]()  # returns the loss as a float: waits for the step
        return time.perf_counter() - started

    def close(self):
        self.steps.clear()
        gc.collect()


def spread(samples) -> float:
    return (max(samples) - min(samples)) / 2


def separated(a, b) -> bool:
    """Whether two precisions' step times differ by more than their spreads."""
    return abs(statistics.median(a) - statistics.median(b)) > spread(a) + spread(b)


def planned_minutes(trainer, seconds_per_step: float):
    """The run's length in minutes at `seconds_per_step`: its budget, or its fixed steps at that speed."""
    if trainer.config.time_budget:
        return float(trainer.config.time_budget)
    total = setup.fixed_total(trainer.config, trainer.shape)
    return None if total is None else total * seconds_per_step / 60


# What `auto` picks on each kind of CPU when nothing is measured (short runs, several workers): AMX runs
# the UNets' convolutions 1.2-1.8x faster in bfloat16 (CPU-A); elsewhere float32.
UNMEASURED = {"amx": "mixed_bfloat16", "avx512_bf16": "float32"}
CPU_NAMES = {"amx": "a CPU with AMX", "avx512_bf16": "a CPU with AVX512-BF16 but no AMX"}


def choose(trainer, sampler=None, log=print, cpu=None, clock=time.perf_counter) -> tuple:
    """Returns (policy, why, measured) for a CPU with bfloat16 instructions (`cpu`: "amx" or
    "avx512_bf16", default `distribute.cpu_bfloat16()`); `measured` maps each timed precision to its
    median seconds a step (empty where nothing was timed). `sampler`: a `StepSampler` (the tests pass
    scripted ones).

    The kind's unmeasured choice (`UNMEASURED`) is timed first; when the run is long enough to pay,
    the two take turns until they separate; the faster is kept, float32 where they do not separate."""
    if cpu is None:
        from keras_seg.distribute import cpu_bfloat16

        cpu = cpu_bfloat16()
    default, kind = UNMEASURED.get(cpu, "float32"), CPU_NAMES.get(cpu, "a CPU")
    recorded = trainer.config.resolved.get("precision") if trainer.config.resume else None
    if recorded in CANDIDATES:  # a resumed run keeps what its first process measured
        return recorded, f"auto: {recorded}, as the run being resumed chose", {}
    if isinstance(trainer.strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return default, (f"auto: {kind}, several workers: {default} (each worker would measure alone, and they "
                         f"could choose differently)"), {}
    budget = trainer.config.time_budget
    if budget and budget < MIN_RUN_MINUTES:
        return default, (f"auto: {kind}; a {budget:g}-min budget is too short for the step measurement to pay "
                         f"(< {MIN_RUN_MINUTES:g} min): {default}"), {}
    other = CANDIDATES[1 - CANDIDATES.index(default)]
    log(f"precision auto: timing the training step in {default} and {other} ({kind})")
    sampler = StepSampler(trainer) if sampler is None else sampler
    try:
        samples = {default: [sampler.sample(default) for _ in range(MIN_ROUNDS)]}
        minutes = planned_minutes(trainer, statistics.median(samples[default]))
        if minutes is not None and minutes < MIN_RUN_MINUTES:
            seconds = statistics.median(samples[default])
            return default, (f"auto: {kind}; the run's ~{minutes:.1f} min at {1000 * seconds:.0f} ms {default} a "
                             f"step is too short for a measurement of {other} to pay: {default}"), {default: seconds}
        samples[other] = []
        started = clock()
        for rounds in range(1, MAX_ROUNDS + 1):
            for precision in (other, default) if rounds % 2 else (default, other):
                samples[precision].append(sampler.sample(precision))
            if rounds >= MIN_ROUNDS and (separated(samples[default], samples[other]) or
                                         clock() - started > MAX_SECONDS):
                break
    finally:
        if hasattr(sampler, "close"):
            sampler.close()
        keras.mixed_precision.set_dtype_policy("float32")
    measured = {name: statistics.median(times) for name, times in samples.items()}
    text = " vs ".join(f"{1000 * measured[name]:.0f} ms {name}" for name in sorted(measured, key=measured.get))
    count = len(samples[other])
    if not separated(samples[default], samples[other]):
        return "float32", (f"auto: measured {text} a step ({kind}), within their spread over {count} steps each: "
                           "float32"), measured
    policy = min(CANDIDATES, key=lambda name: measured[name])
    return policy, f"auto: measured {text} a step ({kind}, {count} steps each)", measured
