"""Where the trainer's step spends its time: TensorFlow's profiler over a few steps, per op.

The step is `tools/bench_vs_torch.py`'s "keras 4" (unet_small, 128x256, batch 8, float32: the
trainer's augmentation, CE + Dice with ENet weights, confusion matrix, AdamW with global-norm
clipping). After warm-up, `--steps` steps run under `tf.profiler`; the trace is turned into
TensorFlow's framework op statistics and printed as the share of self time by op type and the
most expensive single ops ("gradient_tape/..." ops are the backward pass).

    python tools/profile_step.py [--steps 5] [--top 25] [--logdir /tmp/keras_seg_profile]
    taskset -c 0 python tools/profile_step.py      # one core: shares without thread-pool overlap

On several cores ops overlap, so self times add up to more than the wall time; the shares still
say where the work is. The trace stays in --logdir for TensorBoard's profile plugin.
"""

from __future__ import annotations

import argparse
import collections
import glob
import importlib.util
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_vs_torch", os.path.join(HERE, "bench_vs_torch.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--logdir", default="/tmp/keras_seg_profile")
    args = parser.parse_args()

    bench = load_bench()
    import tensorflow as tf

    from keras_seg.augment import AugmentConfig

    images, masks = bench.random_batch(8, 128, 256)
    steps, _ = bench.keras_steps(images, masks, (128, 256), AugmentConfig(), False)
    step = steps["keras 4  + confusion matrix (trainer)"]
    for _ in range(args.warmup):
        step()
    tf.profiler.experimental.start(args.logdir)
    for _ in range(args.steps):
        step()
    tf.profiler.experimental.stop()

    rows = [row for row in op_statistics(args.logdir) if row["type"] != "IDLE"]
    total = sum(row["total_self_time"] for row in rows)
    print(f"{bench.cpu_model_and_flags()[0]}, {os.cpu_count()} cores; {args.steps} profiled steps, "
          f"{total / 1e3 / args.steps:.0f} ms of op self time per step")
    by_type = collections.Counter()
    for row in rows:
        by_type[row["type"]] += row["total_self_time"]
    print("\nshare of self time by op type")
    for op_type, micros in by_type.most_common(args.top):
        print(f"  {100 * micros / total:5.1f}%  {op_type}")
    print("\nmost expensive ops")
    for row in sorted(rows, key=lambda r: -r["total_self_time"])[:args.top]:
        print(f"  {100 * row['total_self_time'] / total:5.1f}%  {row['type']:<32} {row['operation'][:90]}")


if __name__ == "__main__":
    main()
