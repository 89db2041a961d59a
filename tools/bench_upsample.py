"""UpSample2D's bilinear gradient: TensorFlow's ResizeBilinearGrad (one thread on CPU) against the layer's
strided depthwise convolution (`keras_seg.models.layers.bilinear_up_gradient`), side by side.

Two measurements, each path alternating with the other in one process over several rounds (the order
swapped every round), so that load from other processes biases both alike:
  layer  the layer's forward + backward pass alone at unet_small's logits (8x64x128x19 -> 8x128x256x19)
  step   a whole training step of a preset (default unet_small at 128x256, batch 8): forward, sparse
         cross-entropy, GradientTape, Adam; two copies of the model with the same initial weights, one of
         them with `use_resize_gradient = True` on its UpSample2D layers
Prints the CPU (lscpu), TensorFlow's threads and TF_ENABLE_ONEDNN_OPTS, then for each path the wall time
per step (median over the rounds, min-max), the median of the per-round ratios old / new, and the
process's CPU time per step (the work done on all threads, which load from other processes changes less
than the wall time; a multi-threaded path can take more CPU time and less wall time).

    TF_ENABLE_ONEDNN_OPTS=1 python tools/bench_upsample.py                  # ~2 minutes on 2 cores
    python tools/bench_upsample.py --rounds 3 --steps 3                      # a smoke check
    python tools/bench_upsample.py --only step --presets unet_small lraspp_mobilenetv3_small
    python tools/bench_upsample.py --threads 1                                # one thread per op pool
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_seg.quiet import import_tensorflow  # noqa: E402

tf = import_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_seg.models.layers import UpSample2D  # noqa: E402
from keras_seg.models.presets import build_model  # noqa: E402

NUM_CLASSES = 19
PATHS = ("old: ResizeBilinearGrad", "new: depthwise conv")


def cpu_model():
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no lscpu)"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "unknown")


def print_machine():
    intra = tf.config.threading.get_intra_op_parallelism_threads()
    inter = tf.config.threading.get_inter_op_parallelism_threads()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; TensorFlow {tf.__version__}, Keras {keras.__version__}")
    print(f"TF threads: intra-op {intra or 'default'}, inter-op {inter or 'default'}; "
          f"TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset')}")


def load_average():
    return " ".join(f"{load:.2f}" for load in os.getloadavg())


def use_resize_gradient(model_or_layer, value):
    """Sets the switch on every UpSample2D in a model (or on one layer); returns how many it set."""
    layers = model_or_layer.layers if isinstance(model_or_layer, keras.Model) else [model_or_layer]
    found = [layer for layer in layers if isinstance(layer, UpSample2D)]
    for layer in found:
        layer.use_resize_gradient = value
    return len(found)


def layer_steps(batch, height, width, channels):
    """{path: step}: the layer's forward and backward pass at (batch, height, width, channels) x2."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((batch, height, width, channels)).astype(np.float32))
    upstream = tf.constant(rng.standard_normal((batch, 2 * height, 2 * width, channels)).astype(np.float32))
    steps = {}
    for path in PATHS:
        layer = UpSample2D(2, dtype="float32")
        use_resize_gradient(layer, path.startswith("old"))

        @tf.function
        def step(layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(x)
                total = tf.reduce_sum(layer(x) * upstream)
            return tape.gradient(total, x)

        steps[path] = step
    gradients = [steps[path]().numpy() for path in PATHS]
    print(f"layer gradients agree to {relative_difference(*gradients):.1e} of the largest")
    return steps


def model_steps(preset, batch, size):
    """{path: step}: a training step of `preset` at `size`, each path on its own copy of the model."""
    rng = np.random.default_rng(0)
    images = tf.constant(rng.random((batch, *size, 3), dtype=np.float32))
    masks = tf.constant(rng.integers(0, NUM_CLASSES, (batch, *size)), tf.int32)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    steps, first_gradients = {}, []
    for path in PATHS:
        keras.utils.set_random_seed(1)  # the same initial weights for both paths
        model = build_model(preset, NUM_CLASSES, input_size=size)
        switched = use_resize_gradient(model, path.startswith("old"))
        optimizer = keras.optimizers.Adam(1e-3)

        @tf.function
        def gradients(model=model):
            with tf.GradientTape() as tape:
                loss = loss_fn(masks, model(images, training=True))
            return loss, tape.gradient(loss, model.trainable_variables)

        @tf.function
        def step(model=model, optimizer=optimizer, gradients=gradients):
            loss, grads = gradients()
            optimizer.apply(grads, model.trainable_variables)
            return loss

        first_gradients.append(np.concatenate([g.numpy().ravel() for g in gradients()[1]]))
        steps[path] = step
    print(f"{preset}: {switched} UpSample2D layer(s); first-step weight gradients agree to "
          f"{relative_difference(*first_gradients):.1e} of the largest")
    return steps


def relative_difference(a, b):
    return float(np.abs(a - b).max() / np.abs(a).max())


def cpu_seconds():
    return time.process_time()


def time_alternating(steps, rounds, steps_per_round, warmup):
    """({path: wall ms per step in each round}, {path: CPU ms per step in each round}); the paths
    alternate, their order swapped every round."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    wall, cpu = {path: [] for path in steps}, {path: [] for path in steps}
    for round_index in range(rounds):
        order = list(steps) if round_index % 2 == 0 else list(reversed(steps))
        for path in order:
            start, start_cpu = time.perf_counter(), cpu_seconds()
            for _ in range(steps_per_round):
                result = steps[path]()
            np.asarray(result)  # the last step's result, so nothing is left running
            wall[path].append((time.perf_counter() - start) / steps_per_round * 1e3)
            cpu[path].append((cpu_seconds() - start_cpu) / steps_per_round * 1e3)
    return wall, cpu


def report(title, wall, cpu):
    print(f"\n{title}")
    for path, values in wall.items():
        print(f"  {path:<26} {statistics.median(values):8.1f} ms/step (min {min(values):.1f}, "
              f"max {max(values):.1f}, {len(values)} rounds); CPU {statistics.median(cpu[path]):.1f} ms/step")
    old, new = (wall[path] for path in PATHS)
    ratios = [a / b for a, b in zip(old, new)]
    print(f"  old / new per round: median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}, "
          f"max {max(ratios):.2f})")


def parse_size(text):
    height, width = (int(side) for side in text.lower().split("x"))
    return height, width


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("layer", "step"), help="one of the two measurements")
    parser.add_argument("--presets", nargs="+", default=["unet_small"], help="presets for the train step")
    parser.add_argument("--image-size", type=parse_size, default=(128, 256), help="HxW of the train step")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="steps per path per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="TensorFlow's intra- and inter-op threads (0: its "
                        "default, one per core)")
    args = parser.parse_args(argv)
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)

    print_machine()
    print(f"load average at start: {load_average()}")
    if args.only in (None, "layer"):
        height, width = args.image_size[0] // 2, args.image_size[1] // 2
        steps = layer_steps(args.batch_size, height, width, NUM_CLASSES)
        report(f"UpSample2D(2) forward + backward, {args.batch_size}x{height}x{width}x{NUM_CLASSES} -> "
               f"{args.batch_size}x{2 * height}x{2 * width}x{NUM_CLASSES}",
               *time_alternating(steps, args.rounds, args.steps, args.warmup))
    if args.only in (None, "step"):
        for preset in args.presets:
            steps = model_steps(preset, args.batch_size, args.image_size)
            report(f"{preset} train step (CE + Adam), batch {args.batch_size}, "
                   f"{args.image_size[0]}x{args.image_size[1]}",
                   *time_alternating(steps, args.rounds, args.steps, args.warmup))
    print(f"\nload average at end: {load_average()}")


if __name__ == "__main__":
    main()
