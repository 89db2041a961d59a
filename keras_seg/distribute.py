"""Choosing where and how to compute: the `tf.distribute` strategy and the dtype policy."""

from __future__ import annotations

import json
import os

import tensorflow as tf

STRATEGIES = ("auto", "one", "mirrored", "multiworker", "tpu")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")


def cpu_has_bfloat16() -> bool:
    """Whether this CPU has bfloat16 arithmetic instructions (AVX512-BF16 or AMX-BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_precision(name: str, on_gpu: bool) -> str:
    """Resolve `--precision`.

    auto: mixed_float16 on a GPU. On a CPU never mixed_float16 (measured ~5x slower than float32
    on our 2-core machine); mixed_bfloat16 where the CPU has bfloat16 instructions (1.2-1.8x
    faster there, and `tests/test_train.py` checks it reaches float32's mIoU on the demo), else
    float32.
    """
    if name not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {name!r}")
    if name != "auto":
        return name
    if on_gpu:
        return "mixed_float16"
    return "mixed_bfloat16" if cpu_has_bfloat16() else "float32"


def choose_strategy(name: str) -> tf.distribute.Strategy:
    """Resolve `--strategy`.

    auto: MultiWorkerMirroredStrategy when TF_CONFIG describes a cluster of several workers,
    MirroredStrategy when this machine has several GPUs, else the default (one-device) strategy.
    """
    if name not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {STRATEGIES}, got {name!r}")
    if name == "auto":
        cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {})
        if sum(len(v) for v in cluster.values()) > 1:
            name = "multiworker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "one"
    if name == "one":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        # Without GPUs, mirror over the logical CPUs (tests split the CPU into two).
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("--strategy multiworker needs TF_CONFIG describing the cluster (see the README)")
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=os.environ.get("TPU_NAME", ""))
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def strategy_name(strategy: tf.distribute.Strategy) -> str:
    """The `--strategy` name of a strategy object (its class names differ: CollectiveAllReduce...)."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "multiworker"
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        return "mirrored"
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "tpu"
    return "one"


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this worker writes the run directory (the others write to scratch space)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type is None or task_type == "chief" or (task_type == "worker" and task_id == 0 and
                                                          "chief" not in resolver.cluster_spec().as_dict())
