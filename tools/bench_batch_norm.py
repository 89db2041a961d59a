"""The trainer's real step with Keras' BatchNormalization against keras_seg's (TensorFlow's fused kernel in
training, `keras_seg.models.layers.BatchNormalization`), side by side in one process.

Both arms are `keras_seg.training.bench.FixedBatchStep` built from the config
`python -m keras_seg.train --preset P --data DIR` resolves (tools/profile_step.py's `step_config`), on
the same random batch: "keras" with the UNet builder's batch norms as Keras' class (as built before),
"fused" as the builder makes them now. Only the builders that use `keras_seg.models.unet.conv_bn_activation`
(unet, encoder_unet's decoder) change; the output says how many batch norms of each class each arm has.
The arms alternate over rounds, the order swapped every round, so that load from other processes
biases both alike. Prints the CPU, TF_ENABLE_ONEDNN_OPTS, the wall and CPU time per step of each arm
(median over the rounds, min-max), images per second, and the per-round ratio fused / keras (median,
quartiles, min-max): on a shared machine the ratio measured round by round is the figure to read.

    python tools/bench_batch_norm.py                                  # unet_small, float32: ~3 minutes on 2 cores
    python tools/bench_batch_norm.py --precision mixed_bfloat16
    python tools/bench_batch_norm.py --rounds 2 --steps 1              # a smoke check
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from profile_step import cpu_description, describe_config, load_average, real_step, step_config  # noqa: E402

ARMS = ("keras", "fused")


def build_arm(arm, config):
    """The real step with the UNet builder's batch norms as `arm` says."""
    import keras

    from keras_seg.models import unet

    built = unet.BatchNormalization
    if arm == "keras":
        unet.BatchNormalization = keras.layers.BatchNormalization
    try:
        step = real_step(config)
    finally:
        unet.BatchNormalization = built
    counts = {}
    for layer in step.model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            name = f"{type(layer).__module__.split('.')[0]}.{type(layer).__name__}"
            counts[name] = counts.get(name, 0) + 1
    return step, counts


def time_alternating(steps, rounds, steps_per_round):
    """({arm: wall ms per step in each round}, {arm: process CPU ms per step in each round})."""
    wall, cpu = {arm: [] for arm in steps}, {arm: [] for arm in steps}
    for index in range(rounds):
        for arm in (ARMS if index % 2 == 0 else ARMS[::-1]):
            started, started_cpu = time.perf_counter(), time.process_time()
            steps[arm](steps_per_round)  # returns the loss as a float: the steps have finished
            wall[arm].append((time.perf_counter() - started) / steps_per_round * 1e3)
            cpu[arm].append((time.process_time() - started_cpu) / steps_per_round * 1e3)
    return wall, cpu


def describe_ratios(name, ratios):
    if len(ratios) >= 4:
        low, _, high = statistics.quantiles(ratios, n=4)
        spread = f"quartiles {low:.3f}-{high:.3f}, "
    else:
        spread = ""
    return (f"  fused / keras {name}: median {statistics.median(ratios):.3f} ({spread}min {min(ratios):.3f}, "
            f"max {max(ratios):.3f}, {len(ratios)} rounds)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="unet_small", help="a training preset (default unet_small)")
    parser.add_argument("--precision", default="float32", choices=("float32", "mixed_bfloat16", "mixed_float16"))
    parser.add_argument("--rounds", type=int, default=12, help="rounds of each arm (default 12)")
    parser.add_argument("--steps", type=int, default=5, help="steps of each arm per round, in one call (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="steps of each arm before timing (default 2)")
    args = parser.parse_args(argv)
    for flag in ("rounds", "steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    return args


def main(argv=None):
    args = parse_args(argv)
    config = step_config(args.preset, overrides=["--precision", args.precision])
    print(cpu_description())
    print(f"TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset')} (keras_seg sets 1 when unset)")
    print(describe_config(config))
    steps = {}
    for arm in ARMS:
        steps[arm], counts = build_arm(arm, config)
        print(f"{arm}: batch norms {counts}")
    for arm in ARMS:
        started = time.perf_counter()
        loss = steps[arm](max(args.warmup, 1))
        print(f"{arm}: warm-up (trace and {max(args.warmup, 1)} steps) {time.perf_counter() - started:.1f} s, "
              f"loss {loss:.4f}")
    print(f"{load_average()} at start")
    wall, cpu = time_alternating(steps, args.rounds, args.steps)
    print(f"{load_average()} at end\n")
    batch = config.batch_size * config.accumulate
    for arm in ARMS:
        median = statistics.median(wall[arm])
        print(f"  {arm:<6} {median:7.1f} ms/step (min {min(wall[arm]):.1f}, max {max(wall[arm]):.1f}), "
              f"{batch * 1e3 / median:5.1f} img/s; CPU {statistics.median(cpu[arm]):.1f} ms/step "
              f"(min {min(cpu[arm]):.1f}, max {max(cpu[arm]):.1f})")
    print(describe_ratios("wall time per round", [f / k for f, k in zip(wall["fused"], wall["keras"])]))
    print(describe_ratios("CPU time per round ", [f / k for f, k in zip(cpu["fused"], cpu["keras"])]))


if __name__ == "__main__":
    main()
