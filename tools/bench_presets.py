"""Size and CPU training speed of model presets, side by side: parameters, FLOPs per image, img/s.

For each preset: the parameter count (19 classes), the forward FLOPs of one 512x1024 image (TF's
profiler on the frozen graph; a multiply-add counts 2), and training images/s at `--size`
(default 256x512) on synthetic data (Adam, sparse cross-entropy, `train_on_batch`, the model
without its auxiliary head). The presets are timed round-robin and each figure is the median over
the rounds, so that load from other processes biases them alike; ratios are to the first preset.
Encoders start from random weights: speed does not depend on them.

    python tools/bench_presets.py                          # ~6 minutes on 2 CPU cores
    python tools/bench_presets.py --presets unet_small unet_mobilenetv3 --size 128x256
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_seg.models.presets import build_model, list_presets  # noqa: E402

NUM_CLASSES = 19
DEFAULT_PRESETS = ["unet_small", "unet_mobilenetv3", "unet_resnet50", "deeplabv3plus_resnet50"]


def forward_flops(preset, size):
    """Forward FLOPs of one image at `size` (multiply-add = 2), from TF's profiler."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    model = build_model(preset, NUM_CLASSES, input_size=size)
    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec((1, *size, 3), tf.float32))
    frozen = convert_variables_to_constants_v2(concrete)
    options = tf.compat.v1.profiler.ProfileOptionBuilder(
        tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()).with_empty_output().build()
    flops = tf.compat.v1.profiler.profile(graph=frozen.graph, options=options).total_float_ops
    params = model.count_params()
    keras.backend.clear_session()
    return params, flops


def parse_size(text):
    height, width = (int(v) for v in text.lower().split("x"))
    return height, width


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS, choices=list_presets())
    parser.add_argument("--size", type=parse_size, default=(256, 512), help="training input HxW (default 256x512)")
    parser.add_argument("--flops-size", type=parse_size, default=(512, 1024), help="HxW of the FLOPs figure")
    parser.add_argument("--policy", default="float32", choices=["float32", "mixed_bfloat16", "mixed_float16"])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per preset and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    sizes = {name: forward_flops(name, args.flops_size) for name in args.presets}

    rng = np.random.default_rng(0)
    images = rng.random((args.batch_size, *args.size, 3), dtype=np.float32)
    masks = rng.integers(0, NUM_CLASSES, (args.batch_size, *args.size), dtype=np.int32)
    runs = {}
    keras.mixed_precision.set_dtype_policy(args.policy)
    for name in args.presets:
        model = build_model(name, NUM_CLASSES, input_size=args.size)
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.train_on_batch(images, masks)  # trace
        model.train_on_batch(images, masks)
        runs[name] = (model, [])
    for _ in range(args.rounds):
        for model, rates in runs.values():
            start = time.perf_counter()
            for _ in range(args.steps):
                model.train_on_batch(images, masks)
            rates.append(args.steps * args.batch_size / (time.perf_counter() - start))

    h, w = args.size
    fh, fw = args.flops_size
    print(f"{args.policy}, batch {args.batch_size}, {args.rounds} rounds x {args.steps} steps, {os.cpu_count()} CPUs; "
          f"img/s: training at {h}x{w}, median over rounds; GFLOPs: forward, one {fh}x{fw} image (multiply-add = 2)")
    print(f"{'preset':<24} {'params':>12} {'GFLOPs':>8} {'img/s':>7} {'ratio':>6}")
    reference = None
    for name in args.presets:
        rate = statistics.median(runs[name][1])
        reference = reference or rate
        params, flops = sizes[name]
        print(f"{name:<24} {params:>12,} {flops / 1e9:>8.1f} {rate:>7.2f} {rate / reference:>6.2f}")


if __name__ == "__main__":
    main()
