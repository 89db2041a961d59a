"""Measure model size and training speed of UNet candidates on this machine.

Prints, for each candidate (depth, base filters, activation, input size, or a preset) and dtype policy: the
parameter count, the forward pass's multiply-accumulates per image (GMAC, TensorFlow's
profiler: `keras_seg.models.flops`), training images/s on synthetic data (Adam, sparse cross-entropy, one
`train_on_batch` per step) and the speed relative to the first candidate of the same policy.
The candidates are measured side by side, round-robin, and each figure is the median over the
rounds, so that load from other processes on a shared machine biases them all alike.

    python tools/bench_models.py                       # the default candidates, ~4 minutes on 2 cores
    python tools/bench_models.py --policies mixed_bfloat16 --candidates d5_f8_silu_128x256 d5_f8_relu_128x256
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_seg.models.flops import multiply_accumulates  # noqa: E402
from keras_seg.models.presets import build_model  # noqa: E402
from keras_seg.models.unet import build_unet  # noqa: E402

NUM_CLASSES = 19
# name -> (build_unet keyword arguments, (height, width)); the first is the reference of the ratios:
# a plain UNet of 1.9M parameters at 128x128, the current floor.
CANDIDATES = {
    "floor_d4_f16_relu_128x128": (dict(depth=4, base_filters=16, activation="relu"), (128, 128)),
    "d4_f16_silu_128x256": (dict(depth=4, base_filters=16, activation="silu"), (128, 256)),
    "d4_f12_silu_128x256": (dict(depth=4, base_filters=12, activation="silu"), (128, 256)),
    "d4_f12_relu_128x256": (dict(depth=4, base_filters=12, activation="relu"), (128, 256)),
    "d5_f12_silu_128x256": (dict(depth=5, base_filters=12, activation="silu"), (128, 256)),
    "d4_f8_silu_128x256": (dict(depth=4, base_filters=8, activation="silu"), (128, 256)),
    "d4_f8_relu_128x256": (dict(depth=4, base_filters=8, activation="relu"), (128, 256)),
    "d5_f8_silu_128x256": (dict(depth=5, base_filters=8, activation="silu"), (128, 256)),
    "d5_f8_relu_128x256": (dict(depth=5, base_filters=8, activation="relu"), (128, 256)),
    # d5_f8 without its full-resolution level: a stride-2 stem, 4 levels from 16 filters, logits up-sampled
    "s2_d4_f16_relu_128x256": (dict(depth=4, base_filters=16, activation="relu", stem_stride=2), (128, 256)),
    "s2_d4_f16_silu_128x256": (dict(depth=4, base_filters=16, activation="silu", stem_stride=2), (128, 256)),
    "s2_d4_f24_relu_128x256": (dict(depth=4, base_filters=24, activation="relu", stem_stride=2), (128, 256)),
    "d4_f16_silu_256x256": (dict(depth=4, base_filters=16, activation="silu"), (256, 256)),
    # the unet_silu preset itself, for GPU figures: float32 vs mixed_float16 vs mixed_float16 + XLA
    #   python tools/bench_models.py --candidates unet_silu_256x512 --policies float32 mixed_float16
    #   python tools/bench_models.py --candidates unet_silu_256x512 --policies mixed_float16 --jit-compile true
    "unet_silu_256x512": (dict(depth=4, base_filters=64, activation="silu"), (256, 512)),
    # Presets by name (issue 22's real-time models beside unet_small), built as the trainer builds them
    # (without an auxiliary head): python tools/bench_models.py --candidates unet_small_128x256 lraspp_small_256x512
    "unet_small_128x256": ("unet_small", (128, 256)),
    "lraspp_small_128x256": ("lraspp_mobilenetv3_small", (128, 256)),
    "lraspp_small_256x512": ("lraspp_mobilenetv3_small", (256, 512)),
    "lraspp_large_128x256": ("lraspp_mobilenetv3_large", (128, 256)),
    "lraspp_large_256x512": ("lraspp_mobilenetv3_large", (256, 512)),
    "ddrnet23_slim_128x256": ("ddrnet23_slim", (128, 256)),
    "ddrnet23_slim_256x512": ("ddrnet23_slim", (256, 512)),
}
# About 4 minutes on 2 cores; unet_small is d5_f8_silu_128x256.
DEFAULT_CANDIDATES = [
    "floor_d4_f16_relu_128x128",
    "d4_f16_silu_128x256",
    "d4_f12_silu_128x256",
    "d4_f8_silu_128x256",
    "d5_f8_silu_128x256",
    "d5_f8_relu_128x256",
]


def build_candidate(kwargs, size, policy, jit_compile):
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        if isinstance(kwargs, str):  # a preset's model, from random weights
            model = build_model(kwargs, NUM_CLASSES, input_size=size)
        else:
            model = build_unet(NUM_CLASSES, (*size, 3), batch_norm=True, upsampling="transpose", **kwargs)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit_compile,
        )
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", nargs="+", default=["float32", "mixed_bfloat16"])
    parser.add_argument("--candidates", nargs="+", default=DEFAULT_CANDIDATES, choices=list(CANDIDATES))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per candidate and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jit-compile", default="auto", choices=["auto", "true", "false"])
    args = parser.parse_args()
    jit_compile = {"auto": "auto", "true": True, "false": False}[args.jit_compile]

    rng = np.random.default_rng(0)
    runs = {}
    for policy in args.policies:
        for name in args.candidates:
            kwargs, size = CANDIDATES[name]
            model = build_candidate(kwargs, size, policy, jit_compile)
            images = rng.random((args.batch_size, *size, 3), dtype=np.float32)
            masks = rng.integers(0, NUM_CLASSES, (args.batch_size, *size), dtype=np.int32)
            model.train_on_batch(images, masks)  # trace and compile
            model.train_on_batch(images, masks)
            runs[policy, name] = (model, images, masks, [])

    for _ in range(args.rounds):
        for model, images, masks, rates in runs.values():
            start = time.perf_counter()
            for _ in range(args.steps):
                model.train_on_batch(images, masks)
            rates.append(args.steps * args.batch_size / (time.perf_counter() - start))

    print(
        f"batch {args.batch_size}, {args.rounds} rounds x {args.steps} steps, jit_compile={args.jit_compile}, "
        f"{os.cpu_count()} CPUs; img/s = median over rounds; 35 min = epochs of 2,975 images in 35 minutes"
    )
    gmacs = {}  # of the float32 graph: the count does not depend on the policy
    for name in args.candidates:
        kwargs, size = CANDIDATES[name]
        gmacs[name] = multiply_accumulates(build_candidate(kwargs, size, "float32", False), size) / 1e9
    print(f"{'candidate':<28} {'policy':<15} {'params':>10} {'GMAC':>6} {'img/s':>7} {'ratio':>6} {'35 min':>7}")
    for policy in args.policies:
        reference = None
        for name in args.candidates:
            model, _, _, rates = runs[policy, name]
            rate = statistics.median(rates)
            reference = reference or rate
            epochs = rate * 35 * 60 / 2975
            params = model.count_params()
            print(f"{name:<28} {policy:<15} {params:>10,} {gmacs[name]:>6.2f} {rate:>7.1f} {rate / reference:>6.2f} "
                  f"{epochs:>7.1f}")


if __name__ == "__main__":
    main()
