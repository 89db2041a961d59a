"""`--precision auto` on a CPU with bfloat16 instructions: time the run's own step in both precisions.

On such CPUs bfloat16 may be faster or slower than float32 depending on the model, with AMX or without
(CPU-C, an AMD EPYC with avx512_bf16: about equal for unet_small, 1.3x slower for an LR-ASPP MobileNetV3;
CPU-D, an Intel Xeon with AMX: 1.17x faster for unet_small, 1.34x slower for LR-ASPP MobileNetV3-Small;
docs/performance.md), so `distribute.choose_precision` leaves the choice to this measurement: a few
training steps of the actual model, on the actual input pipeline, after tracing, in each precision (the
kind of CPU's unmeasured choice first); the faster is kept.

It runs only where it can pay: a time budget of `MIN_RUN_MINUTES` or more, or a fixed-length run that the
first precision's steps alone put at that length or more. It is counted in a time budget because the budget counts
from the process's start. It never runs with an explicit `--precision`, nor across several workers (each
would measure alone and they could pick different precisions).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import keras
import tensorflow as tf

from keras_seg.training import setup
from keras_seg.training.step import make_train_steps

# A run shorter than this gains less from the faster precision than the measurement costs.
MIN_RUN_MINUTES = 10.0
# Timed one-step calls per precision, after a two-step call that traces the step.
TIMED_STEPS = 3
CANDIDATES = ("float32", "mixed_bfloat16")
# The probes' iterators live until the process ends: deleting one waits for tf.data's autotuning thread,
# asleep for up to a minute (`trainer.keep_until_exit`).
_KEPT_ITERATORS = []


def time_step(trainer, precision: str, steps: int = TIMED_STEPS) -> float:
    """Median seconds of one training step of `trainer`'s run in `precision`, after tracing.

    The run's state, input stream and step are built as the run builds them (`setup`, `step`: no
    file cache, no encoder weights, no resume: the step costs the same), from the same seed; the real
    run builds its own afterwards.
    """
    config = dataclasses.replace(trainer.config, precision=precision, cache=None, resume=False, init_from=None,
                                 encoder_weights="none")
    keras.mixed_precision.set_dtype_policy(precision)
    state = setup.build_state(config, trainer.shape, trainer.strategy, precision,
                              setup.fixed_total(config, trainer.shape), log=lambda *_: None)
    datasets = setup.build_datasets(config, trainer.shape, trainer.strategy, 0, log=lambda *_: None)
    train_steps = make_train_steps(state, config, trainer.strategy, log=lambda *_: None)
    iterator = iter(datasets.train)
    _KEPT_ITERATORS.append(iterator)
    train_steps(iterator, tf.constant(2))  # traces
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        float(train_steps(iterator, tf.constant(1)))  # float(): waits for the step's result
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


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


def choose(trainer, timer=time_step, log=print, cpu=None) -> tuple:
    """Returns (policy, why, measured) for a CPU with bfloat16 instructions (`cpu`: "amx" or
    "avx512_bf16", default `distribute.cpu_bfloat16()`); `measured` maps each timed precision to its
    median seconds a step (empty where nothing was timed).

    The kind's unmeasured choice (`UNMEASURED`) is timed first; when the run is long enough to pay,
    the other precision too, and the faster is kept."""
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
    measured = {default: timer(trainer, default)}
    minutes = planned_minutes(trainer, measured[default])
    if minutes is not None and minutes < MIN_RUN_MINUTES:
        return default, (f"auto: {kind}; the run's ~{minutes:.1f} min at {1000 * measured[default]:.0f} ms "
                         f"{default} a step is too short for a measurement of {other} to pay: {default}"), measured
    measured[other] = timer(trainer, other)
    keras.mixed_precision.set_dtype_policy("float32")
    policy = min(CANDIDATES, key=lambda name: measured[name])
    slower = CANDIDATES[1 - CANDIDATES.index(policy)]
    why = (f"auto: measured {1000 * measured[policy]:.0f} ms {policy} vs {1000 * measured[slower]:.0f} ms {slower} "
           f"a step ({kind})")
    return policy, why, measured
