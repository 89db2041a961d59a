"""What the cross-replica update costs on one device: the trainer's step before and after it.

Both steps train `unet_small` on one synthetic batch (128x256, batch 8, CE + Dice with class
weights, AdamW, global-norm clipping at 1.0) in one process, alternating, and each figure is the
median over rounds:

* keras: the Keras path the trainer used before: `loss(masks, logits)` and `optimizer.apply`
  with the optimizer's own `global_clipnorm`;
* global: `keras_seg.replicas`: the loss from its summed statistics, the gradients summed over
  replicas, clipped by their global norm and applied (on one device the sums are no-ops).

    python tools/bench_replica_step.py [--rounds 5 --steps 10 --policy float32]
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

from keras_seg import losses  # noqa: E402
from keras_seg.models.presets import build_model  # noqa: E402
from keras_seg.replicas import apply_global_gradients, global_batch_loss  # noqa: E402


def make_step(kind, policy):
    keras.mixed_precision.set_dtype_policy(policy)
    keras.utils.set_random_seed(0)
    model = build_model("unet_small", 19)
    loss_fn = losses.build_loss("ce+dice", num_classes=19, class_weights=np.linspace(0.5, 2.0, 19))
    clip = {"global_clipnorm": 1.0} if kind == "keras" else {}
    optimizer = keras.optimizers.AdamW(1e-3, **clip)
    optimizer.build(model.trainable_variables)

    @tf.function
    def step(images, masks):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = loss_fn(masks, logits) if kind == "keras" else global_batch_loss(loss_fn, masks, logits)
        grads = tape.gradient(loss, model.trainable_variables)
        if kind == "keras":
            optimizer.apply(grads, model.trainable_variables)
        else:
            apply_global_gradients(optimizer, grads, model.trainable_variables, clipnorm=1.0)
        return loss

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--policy", default="float32")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = tf.constant(rng.random((8, 128, 256, 3), np.float32))
    masks = tf.constant(rng.integers(0, 19, (8, 128, 256)).astype(np.uint8))
    steps = {kind: make_step(kind, args.policy) for kind in ("keras", "global")}
    for step in steps.values():
        step(images, masks).numpy()  # trace and compile
    times = {kind: [] for kind in steps}
    for _ in range(args.rounds):
        for kind, step in steps.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                loss = step(images, masks)
            loss.numpy()
            times[kind].append((time.perf_counter() - started) / args.steps)
    print(f"{os.cpu_count()} CPUs, {args.policy}, unet_small 128x256 batch 8, median of {args.rounds} rounds "
          f"of {args.steps} steps")
    reference = statistics.median(times["keras"])
    for kind, values in times.items():
        median = statistics.median(values)
        print(f"{kind:<7} {1000 * median:8.1f} ms/step {8 / median:7.1f} img/s  ratio {reference / median:.3f}")


if __name__ == "__main__":
    main()
