"""Where the trainer's step spends its time: TensorFlow's profiler over the run's real step, per op.

The step is the one a training run compiles (`keras_seg.training.bench.FixedBatchStep`: the
preset's model, augmentation, loss and class weights, the train mIoU's confusion matrix, the
optimizer with the trainer's global-norm clipping and its schedule), fed one random batch over and
over (19 classes, some pixels ignored) instead of the input pipeline. The config is the one
`python -m keras_seg.train --preset P --data DIR` resolves (`--demo`: the one without `--data`,
i.e. the preset's demo settings), float32 unless `--precision` says otherwise. After a warm-up
call (it traces and compiles), `--steps` steps run under `tf.profiler` in calls of the config's
`steps_per_call` (10 for every preset), as the trainer calls them; the trace is turned into
TensorFlow's framework op statistics and printed as the share of self time by op type and the
most expensive single ops ("gradient_tape/..." ops are the backward pass).

    python tools/profile_step.py                             # unet_small, 128x256, batch 8
    python tools/profile_step.py --preset unet_silu --demo   # the default command's step: 64x128, 16 filters, batch 16
    python tools/profile_step.py --steps 20 --top 25 --logdir /tmp/keras_seg_profile
    taskset -c 0 python tools/profile_step.py                # one core: shares without thread-pool overlap

On several cores ops overlap, so self times add up to more than the wall time; the shares still
say where the work is. The wall time per step printed is measured under the profiler, which slows
the step: time the step with tools/bench_onednn.py or tools/bench_vs_torch.py. The trace stays in
--logdir for TensorBoard's profile plugin.

`step_config`, `random_batch`, `real_step` and `cpu_description` are also what
tools/bench_vs_torch.py and tools/bench_onednn.py time with (this file imports no TensorFlow until
they are called).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NUM_CLASSES = 19  # Cityscapes' train ids: the demo data set's and the Cityscapes presets' classes
IGNORE_INDEX = 255  # keras_seg.labels.IGNORE_INDEX (imported from there would load the package's labels early)
IGNORED_FRACTION = 0.05  # of the mask pixels
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


# --------------------------------------------------------------------------- the machine


def cpu_description() -> str:
    """One line: lscpu's model name, family and model, core count, and whether the CPU has the flags
    TensorFlow's kernels depend on (AVX2, AVX-512, AVX512-BF16, AMX)."""
    fields = {}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())}
    except (OSError, subprocess.SubprocessError):
        pass
    flags = set(fields.get("Flags", "").split())
    if not flags:  # no lscpu: /proc/cpuinfo has the same names
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                for line in cpuinfo:
                    key, _, value = line.partition(":")
                    fields.setdefault({"model name": "Model name", "cpu family": "CPU family",
                                       "model": "Model"}.get(key.strip(), key.strip()), value.strip())
                    if key.strip() == "flags":
                        flags = set(value.split())
                        break
        except OSError:
            pass
    present = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in CPU_FLAGS)
    return (f"CPU: {fields.get('Model name', 'unknown')} (family {fields.get('CPU family', '?')}, "
            f"model {fields.get('Model', '?')}), {os.cpu_count()} cores; {present}")


def load_average() -> str:
    return "load average " + " ".join(f"{load:.2f}" for load in os.getloadavg())


# --------------------------------------------------------------------------- the real step


def step_config(preset: str, demo: bool = False, overrides=()):
    """The TrainConfig `python -m keras_seg.train --preset PRESET [--data unused] OVERRIDES` resolves:
    without --data (`demo`), the preset's demo settings. A bad value exits with the train command's
    one-line error."""
    from keras_seg.quiet import import_tensorflow

    import_tensorflow()  # keras_seg.train imports TensorFlow: without its start-up notices
    from keras_seg.config import ConfigError
    from keras_seg.train import build_parser, resolve_config

    def refuse(message):
        print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
        sys.exit(2)

    parser = build_parser()
    parser.error = refuse  # one line, not the train command's whole usage
    argv = ["--preset", preset, *(() if demo else ("--data", "unused")), *overrides]
    try:
        return resolve_config(parser.parse_args(argv))
    except ConfigError as error:
        refuse(error)


def random_batch(batch, height, width, num_classes=NUM_CLASSES, seed=0):
    """Images in [0, 1] on the uint8 grid [B, H, W, 3], and uint8 masks [B, H, W].

    Classes are drawn with unequal frequencies so that class weights differ between classes; a few
    pixels are ignored.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    images = np.round(rng.random((batch, height, width, 3)) * 255.0).astype(np.float32) / 255.0
    frequencies = 1.0 / np.arange(1, num_classes + 1)
    masks = rng.choice(num_classes, size=(batch, height, width), p=frequencies / frequencies.sum()).astype(np.uint8)
    masks[rng.random(masks.shape) < IGNORED_FRACTION] = IGNORE_INDEX
    return images, masks


def real_step(config, strategy=None):
    """The run's compiled step (`FixedBatchStep`) on a random batch of the config's size and batch
    (accumulated micro-batches included), in the config's precision: `step(n)` runs n steps."""
    from keras_seg.training.bench import FixedBatchStep

    height, width = config.image_size
    images, masks = random_batch(config.batch_size * config.accumulate, height, width)
    return FixedBatchStep(config, images, masks, NUM_CLASSES, precision=config.precision, strategy=strategy)


def describe_config(config) -> str:
    """One line: what the step does."""
    from keras_seg.augment import AugmentConfig

    height, width = config.image_size
    augmentation = "off" if config.augment == AugmentConfig.disabled().to_dict() else "on"
    weights = "" if config.class_weights in (None, "none") else f", {config.class_weights} weights"
    return (f"{config.preset}{' (demo settings)' if config.demo else ''}: {height}x{width}, batch {config.batch_size}, "
            f"{config.precision}, {config.optimizer}, loss {config.loss}{weights}, augmentation {augmentation}, "
            f"{'XLA' if config.jit else 'tf.function'}")


# --------------------------------------------------------------------------- the profile


def op_statistics(logdir):
    """Rows of TensorFlow's framework op statistics for the newest trace in `logdir`, as dicts."""
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as plugin

    traces = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    data, ok = plugin.xspace_to_tools_data(traces[-1:], "framework_op_stats", {})
    if not ok:
        raise RuntimeError(f"could not read the trace in {logdir}")
    table = json.loads(data)[0]
    columns = [column["id"] for column in table["cols"]]
    return [dict(zip(columns, [cell.get("v") for cell in row["c"]])) for row in table["rows"]]


def profile(step, steps, steps_per_call, logdir):
    """Seconds of wall time for `steps` steps under the profiler, in calls of `steps_per_call`."""
    import tensorflow as tf

    tf.profiler.experimental.start(logdir)
    started, done = time.perf_counter(), 0
    while done < steps:
        n = min(steps_per_call, steps - done)
        step(n)  # returns the loss as a float: the steps have finished
        done += n
    seconds = time.perf_counter() - started
    tf.profiler.experimental.stop()
    return seconds


def print_statistics(rows, steps, top):
    rows = [row for row in rows if row["type"] != "IDLE"]
    total = sum(row["total_self_time"] for row in rows)
    print(f"{total / 1e3 / steps:.0f} ms of op self time per step")
    by_type = collections.Counter()
    for row in rows:
        by_type[row["type"]] += row["total_self_time"]
    print("\nshare of self time by op type")
    for op_type, micros in by_type.most_common(top):
        print(f"  {100 * micros / total:5.1f}%  {op_type}")
    print("\nmost expensive ops")
    for row in sorted(rows, key=lambda r: -r["total_self_time"])[:top]:
        print(f"  {100 * row['total_self_time'] / total:5.1f}%  {row['type']:<32} {row['operation'][:90]}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="unet_small", help="a training preset (default unet_small)")
    parser.add_argument("--demo", action="store_true",
                        help="the preset's demo settings (the train command without --data); "
                             "--preset unet_silu --demo is the default command's step")
    parser.add_argument("--image-size", metavar="HxW", help="override the config's training size")
    parser.add_argument("--batch-size", type=int, help="override the config's batch")
    parser.add_argument("--precision", default="float32", choices=("float32", "mixed_bfloat16", "mixed_float16"))
    parser.add_argument("--jit", action="store_true", help="XLA-compile the step, as train --jit")
    parser.add_argument("--steps", type=int, default=20, help="profiled steps")
    parser.add_argument("--steps-per-call", type=int, help="steps in one call of the compiled loop "
                                                           "(default: the config's, as the trainer)")
    parser.add_argument("--warmup", type=int, default=2, help="steps of the untimed first call, which compiles")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--logdir", default="/tmp/keras_seg_profile")
    args = parser.parse_args(argv)
    for name in ("steps", "warmup", "top", "steps_per_call", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def overrides_of(args) -> list:
    """The train command's flags for the tool's own overrides."""
    overrides = ["--precision", args.precision]
    if args.image_size:
        overrides += ["--image-size", args.image_size]
    if args.batch_size:
        overrides += ["--batch-size", str(args.batch_size)]
    if args.jit:
        overrides.append("--jit")
    return overrides


def main(argv=None):
    args = parse_args(argv)
    config = step_config(args.preset, args.demo, overrides_of(args))
    from keras_seg import quiet
    from keras_seg.distribute import onednn_state

    with quiet.native_stderr_filtered_while_running():
        step = real_step(config)
        step(args.warmup)
        per_call = min(args.steps_per_call or config.steps_per_call, args.steps)
        seconds = profile(step, args.steps, per_call, args.logdir)
        rows = op_statistics(args.logdir)
    onednn = onednn_state()
    print(cpu_description())
    print(f"oneDNN {'on' if onednn['enabled'] else 'off'} ({onednn['why']}); {load_average()}")
    print(describe_config(config))
    print(f"{args.steps} profiled steps in calls of {per_call}: {1000 * seconds / args.steps:.0f} ms a step of wall "
          f"time under the profiler, ", end="")
    print_statistics(rows, args.steps, args.top)


if __name__ == "__main__":
    main()
