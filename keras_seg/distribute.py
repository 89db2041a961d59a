"""Choosing where and how to compute: the `tf.distribute` strategy and the dtype policy."""

from __future__ import annotations

import itertools
import json
import os

import tensorflow as tf

STRATEGIES = ("auto", "one", "mirrored", "multiworker", "tpu")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")


# `choose_precision`'s answer where only a measurement of the run's own step can decide
# (`keras_seg.training.precision_probe`): a CPU with bfloat16 instructions.
MEASURE = "measure"


def cpu_bfloat16(cpuinfo="/proc/cpuinfo") -> str | None:
    """The CPU's bfloat16 instructions: "amx" (AMX-BF16 tiles), "avx512_bf16" (without AMX) or None."""
    try:
        with open(cpuinfo) as f:
            flags = set(f.read().split())
    except OSError:
        return None
    if "amx_bf16" in flags:
        return "amx"
    return "avx512_bf16" if "avx512_bf16" in flags else None


def onednn_state() -> dict:
    """Whether TensorFlow's oneDNN kernels are on in this process, and why (for config.json and the log)."""
    import keras_seg
    from tensorflow.python.util import _pywrap_util_port

    why = {"keras_seg": "TF_ENABLE_ONEDNN_OPTS=1, keras-seg's default",
           "environment": f"TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS')} in the environment",
           "tensorflow": "TensorFlow's own choice for this CPU: it was imported before keras_seg"}
    return {"enabled": bool(_pywrap_util_port.IsMklEnabled()), "why": why[keras_seg.ONEDNN_SOURCE]}


def choose_precision(name: str, gpus=None) -> tuple:
    """Resolve `--precision`: returns (policy, why), the why for the run's log.

    auto, decided from the hardware:
    - on GPUs, by the lowest compute capability among them: 8.0 and above (Ampere, Hopper, ...)
      mixed_bfloat16, as fast as float16 there and without loss scaling; 7.x (Volta, Turing)
      mixed_float16, which their tensor cores run; below 7.0 float32 (no tensor cores: float16
      brings little and costs loss scaling);
    - on a CPU never mixed_float16 (about 5x slower than float32 on CPU-A, docs/performance.md);
      with bfloat16 instructions (AMX, or AVX512-BF16 without it), `MEASURE`: the faster of the two
      on the run's own step decides (`keras_seg.training.precision_probe`; bfloat16 was 1.2-1.8x faster for
      the UNets with AMX on CPU-A, and 1.3x slower for LR-ASPP MobileNetV3 both on CPU-C, without
      AMX, and on CPU-D, with it); where the run is too short to pay for the measurement, AMX
      gives mixed_bfloat16 and AVX512-BF16 alone float32; else float32.

    Args:
        name: one of PRECISIONS.
        gpus: the physical GPUs (default: `tf.config.list_physical_devices("GPU")`).
    """
    if name not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {name!r}")
    if name != "auto":
        return name, "--precision " + name
    gpus = tf.config.list_physical_devices("GPU") if gpus is None else gpus
    if gpus:
        capabilities = [tf.config.experimental.get_device_details(gpu).get("compute_capability") for gpu in gpus]
        if None in capabilities:
            return "mixed_float16", "auto: a GPU of unknown compute capability"
        major, minor = min(capabilities)
        capability = f"GPU compute capability {major}.{minor}"
        if major >= 8:
            return "mixed_bfloat16", f"auto: {capability} >= 8.0 runs bfloat16 as fast as float16, without loss scaling"
        if major == 7:
            return "mixed_float16", f"auto: {capability} (7.x: float16 tensor cores, bfloat16 unsupported)"
        return "float32", f"auto: {capability} < 7.0 has no tensor cores: mixed precision would bring little"
    bfloat16 = cpu_bfloat16()
    if bfloat16 == "amx":
        return MEASURE, "auto: a CPU with AMX: the faster precision on this run's step (else mixed_bfloat16)"
    if bfloat16 == "avx512_bf16":
        return MEASURE, "auto: a CPU with AVX512-BF16 but no AMX: the faster precision on this run's step"
    return "float32", "auto: a CPU without bfloat16 instructions (float16 and bfloat16 would be slower there)"


def split_cpu(devices: int):
    """Split the CPU into `devices` logical devices, so that mirrored training can be checked on a
    machine without GPUs. Possible only before TensorFlow initializes its devices."""
    cpus = tf.config.list_physical_devices("CPU")  # (listing logical devices would initialize them)
    if tf.config.list_physical_devices("GPU") or len(tf.config.get_logical_device_configuration(cpus[0]) or
                                                     [None]) >= devices:
        return
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * devices)
    except RuntimeError as err:  # already initialized with fewer
        raise ValueError(f"--devices {devices}: TensorFlow has already set up its CPU devices ({err})") from err


_STRATEGIES_MADE = itertools.count()


def mirrored_strategy(devices: list) -> tf.distribute.MirroredStrategy:
    """A MirroredStrategy over `devices` whose collective operations cannot clash with an earlier one's.

    Every MirroredStrategy numbers its collective groups from the same start, and TensorFlow's runtime
    keeps the first strategy's shapes under those numbers for the life of the process: a second
    strategy's reductions (another run in a notebook or a sweep, or tests) then abort with "Shape
    mismatch in the collective instance 100". TensorFlow offsets the numbers by the class attribute
    `_collective_key_base` in its own tests; each strategy made here gets its own offset.
    """
    offset = 100_000 * next(_STRATEGIES_MADE)
    saved = getattr(tf.distribute.MirroredStrategy, "_collective_key_base", None)
    if saved is None:  # a TensorFlow without the attribute: its default numbering
        return tf.distribute.MirroredStrategy(devices)
    tf.distribute.MirroredStrategy._collective_key_base = offset
    try:
        return tf.distribute.MirroredStrategy(devices)
    finally:
        tf.distribute.MirroredStrategy._collective_key_base = saved


def choose_strategy(name: str, devices: int = 0) -> tf.distribute.Strategy:
    """Resolve `--strategy`.

    auto: MultiWorkerMirroredStrategy when TF_CONFIG describes a cluster of several workers,
    MirroredStrategy when this machine has several GPUs, else the default (one-device) strategy.
    devices: with mirrored, use the first N GPUs, or on a machine without GPUs N logical CPUs
    (0: all GPUs, or every logical CPU).
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
        if devices:
            split_cpu(devices)
        gpus = tf.config.list_logical_devices("GPU")
        # Without GPUs, mirror over the logical CPUs (tests split the CPU into three).
        names = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        if devices and len(names) < devices:
            raise ValueError(f"--devices {devices}: only {len(names)} devices ({', '.join(names)})")
        return mirrored_strategy(names[:devices] if devices else names)
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


def is_chief_worker_from_env() -> bool:
    """Whether TF_CONFIG (if any) makes this process the chief, read before any strategy exists: only
    the chief prepares, overwrites and writes the run directory."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    cluster, task = config.get("cluster", {}), config.get("task", {})
    if sum(len(v) for v in cluster.values()) <= 1:
        return True
    if "chief" in cluster:
        return task.get("type") == "chief"
    return task.get("type", "worker") == "worker" and int(task.get("index", 0)) == 0
