"""Measure the training input pipeline (TFRecords -> keras_seg.data -> keras_seg.augment).

Prints images/s of the full training input pipeline (read, decode, batch, augment) beside a
baseline written the way the seed notebooks worked: per-file loading of image and mask with PIL,
the same transforms one image at a time with numpy / OpenCV, in a Python generator, one process.
Candidates of a section are measured side by side, round-robin: images/s is the median over the
rounds, and the ratio to the baseline is the median of the ratios within each round, so that load
from other processes on a shared machine biases them alike.

Sections:
  pairs     256x256: the converted cityscapes_pairs (`--pairs-tfr`, from tools/make_tfrecords.py)
            against the baseline on the raw pair JPEGs (`--pairs-dir`; colour mask -> trainId by
            nearest Cityscapes colour, as the notebooks did).
  fullres   1024x2048: synthetic shards stored with PNG images and with JPEG images, against the
            baseline on the same examples as PNG files.
  wait      share of wall time a CPU training run (UNet, augmentation in the training step) spends
            waiting for the next batch.
  gpu       augmentation of a batch of 8 at 512x1024 on the GPU and on the CPU (skipped without GPU).

    python tools/bench_input_pipeline.py --pairs-tfr /tmp/pairs_tfr
    python tools/bench_input_pipeline.py --sections fullres --rounds 2
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The baseline's colour lookup is a [65536, 3] x [3, 29] product: BLAS threads only spin on it
# (25x slower than one thread on this 2-core machine while other work runs).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from keras_seg import data, tfrecord  # noqa: E402
from keras_seg.augment import AugmentConfig, augment_segmentation  # noqa: E402
from keras_seg.labels import IGNORE_INDEX, cityscapes_color_table  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data")
CONFIG = AugmentConfig()  # the defaults, for both the pipeline and the baseline


# --------------------------------------------------------------------------- the baseline


def nearest_class(colour_mask, colors, classes):
    """Colour mask -> class ids by nearest palette colour (JPEG-compressed colours are noisy).

    |p - c|^2 = |p|^2 - 2 p.c + |c|^2; |p|^2 is the same for every c, so one small matmul does it
    (the baseline is meant to be a reasonable notebook, not a slow one).
    """
    pixels = colour_mask.reshape(-1, 3).astype(np.float32)
    palette = colors.astype(np.float32)
    score = pixels @ (-2.0 * palette.T) + (palette**2).sum(1)
    return classes[score.argmin(-1)].reshape(colour_mask.shape[:2])


def numpy_augment(image, mask, rng, config=CONFIG):
    """The transforms of `keras_seg.augment` (defaults), one image, numpy / OpenCV."""
    height, width = mask.shape
    if rng.random() < config.flip_prob:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if rng.random() < config.scale_prob:
        scale = rng.uniform(*config.scale_range)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(np.ascontiguousarray(image), size, interpolation=cv2.INTER_LINEAR)
        mask = cv2.resize(np.ascontiguousarray(mask), size, interpolation=cv2.INTER_NEAREST)
        pad_h, pad_w = max(height - size[1], 0), max(width - size[0], 0)
        top, left = rng.integers(0, pad_h + 1), rng.integers(0, pad_w + 1)
        image = cv2.copyMakeBorder(image, top, pad_h - top, left, pad_w - left, cv2.BORDER_CONSTANT, value=0)
        mask = cv2.copyMakeBorder(mask, top, pad_h - top, left, pad_w - left, cv2.BORDER_CONSTANT, value=IGNORE_INDEX)
        y0 = rng.integers(0, image.shape[0] - height + 1)
        x0 = rng.integers(0, image.shape[1] - width + 1)
        image, mask = image[y0:y0 + height, x0:x0 + width], mask[y0:y0 + height, x0:x0 + width]
    if rng.random() < config.rotation_prob:
        angle = rng.uniform(-config.rotation_degrees, config.rotation_degrees)
        matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
        image = cv2.warpAffine(np.ascontiguousarray(image), matrix, (width, height), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        mask = cv2.warpAffine(np.ascontiguousarray(mask), matrix, (width, height), flags=cv2.INTER_NEAREST,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=IGNORE_INDEX)
    image = image.astype(np.float32) / 255.0
    if rng.random() < config.brightness_prob:
        image = np.clip(image + rng.uniform(-config.brightness_delta, config.brightness_delta), 0, 1)
    if rng.random() < config.contrast_prob:
        mean = image.mean(axis=(0, 1), keepdims=True)
        image = np.clip((image - mean) * rng.uniform(*config.contrast_range) + mean, 0, 1)
    sat_on, hue_on = rng.random() < config.saturation_prob, rng.random() < config.hue_prob
    if sat_on or hue_on:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)  # float: H in [0, 360)
        if sat_on:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*config.saturation_range), 0, 1)
        if hue_on:
            hsv[..., 0] = (hsv[..., 0] + 360.0 * rng.uniform(-config.hue_delta, config.hue_delta)) % 360.0
        image = np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0, 1)
    return image, np.ascontiguousarray(mask)


def baseline_batches(load, items, batch_size, seed=0, augment=True):
    """Python generator of (images, masks) batches: load + augment one example at a time."""
    rng = np.random.default_rng(seed)
    items = list(items)
    while True:
        rng.shuffle(items)
        for start in range(0, len(items) - batch_size + 1, batch_size):
            loaded = [load(item) for item in items[start:start + batch_size]]
            if augment:
                pairs = [numpy_augment(image, mask, rng) for image, mask in loaded]
            else:
                pairs = [(image.astype(np.float32) / 255.0, mask) for image, mask in loaded]
            yield np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


COLOR_TABLE = cityscapes_color_table("trainid")


def load_pair_jpeg(path):
    pair = np.asarray(Image.open(path).convert("RGB"))
    width = pair.shape[1] // 2
    return pair[:, :width], nearest_class(pair[:, width:], *COLOR_TABLE)


def load_png_files(item):
    image_path, mask_path = item
    return np.asarray(Image.open(image_path).convert("RGB")), np.asarray(Image.open(mask_path))


# --------------------------------------------------------------------------- the pipeline


def make_augment():
    compiled = tf.function(lambda x, y, s: augment_segmentation(x, y, s, CONFIG), jit_compile=True)
    return compiled


def pipeline_batches(data_dir, batch_size, image_size, augment=True, **kwargs):
    """Iterate build_dataset(...) and augment each batch as the training step would."""
    ds = data.build_dataset(data_dir, "train", training=True, batch_size=batch_size, image_size=image_size,
                            shuffle_seed=0, repeat=True, **kwargs)
    compiled = make_augment() if augment else None
    step = 0
    for images, masks in ds:
        if compiled is not None:
            images, masks = compiled(images, masks, tf.constant([0, step], tf.int64))
        step += 1
        yield images, masks


# --------------------------------------------------------------------------- measuring


def compare(candidates, batch_size, seconds, rounds, min_batches=3, warmup=2):
    """candidates: {name: generator}. Each round runs each candidate for `seconds` (at least
    `min_batches`), so that batches a pipeline prefetched while others ran weigh little.
    Prints and returns {name: median images/s}."""
    for gen in candidates.values():
        for _ in range(warmup):  # tracing, XLA compilation, autotuning
            np.asarray(next(gen)[1])
    rates = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, gen in candidates.items():
            start = time.perf_counter()
            batches = 0
            while batches < min_batches or time.perf_counter() - start < seconds:
                np.asarray(next(gen)[1])  # the mask reaching the host: the batch is done
                batches += 1
            rates[name].append(batches * batch_size / (time.perf_counter() - start))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    reference = rates[next(iter(rates))]
    for name, rate in medians.items():
        # The ratio is taken within each round (same load for all) and then the median.
        ratio = statistics.median(r / base for r, base in zip(rates[name], reference))
        spread = ", ".join(f"{r:.0f}" for r in rates[name])
        print(f"  {name:<44} {rate:8.1f} images/s   x{ratio:5.2f}   (rounds: {spread})")
    return medians


def section_pairs(args):
    print(f"\n== pairs 256x256: {args.pairs_tfr} vs raw JPEGs in {args.pairs_dir}, batch {args.batch_size}")
    if not os.path.exists(os.path.join(args.pairs_tfr, tfrecord.DATASET_INFO_NAME)):
        print("  skipped: no converted pairs (tools/make_tfrecords.py cityscapes-pairs ... --output DIR)")
        return
    paths = sorted(glob.glob(os.path.join(args.pairs_dir, "*.jpg")))
    if not paths:
        print("  skipped: no pair JPEGs")
        return
    candidates = {
        "baseline: PIL + numpy/OpenCV generator": baseline_batches(load_pair_jpeg, paths, args.batch_size),
        "keras_seg.data + augment (XLA, in step)": pipeline_batches(args.pairs_tfr, args.batch_size, (256, 256)),
        "keras_seg.data only (no augment)": pipeline_batches(args.pairs_tfr, args.batch_size, (256, 256),
                                                             augment=False),
    }
    compare(candidates, args.batch_size, args.seconds, args.rounds)


def synthetic_fullres(directory, count, height=1024, width=2048, seed=0):
    """Full-resolution examples as PNG files and as PNG- and JPEG-image shards.

    The images are the full-resolution Cityscapes photos in shared/data when present (rolled and
    flipped per example, so every example differs), else smooth random fields; the masks are the
    official sample's labelTrainIds (or blocks), rolled alike. Returns (png_dir, jpeg_dir, files).
    """
    rng = np.random.default_rng(seed)
    photos = sorted(glob.glob(os.path.join(SHARED, "cityscapes_*", "leftImg8bit", "*", "*", "*_leftImg8bit.png")))
    labels = sorted(glob.glob(os.path.join(SHARED, "cityscapes_official_sample", "gtFine", "*", "*",
                                           "*_labelTrainIds.png")))
    sources = [np.asarray(Image.open(p).convert("RGB").resize((width, height))) for p in photos[:3]]
    mask_sources = [np.asarray(Image.open(p).resize((width, height), Image.NEAREST)) for p in labels[:1]]
    if not sources:
        noise = rng.uniform(0, 255, (3, height // 32, width // 32, 3)).astype(np.float32)
        sources = [cv2.resize(n, (width, height), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)
                   for n in noise]
    if not mask_sources:
        blocks = rng.integers(0, 19, (height // 64, width // 64)).astype(np.uint8)
        mask_sources = [cv2.resize(blocks, (width, height), interpolation=cv2.INTER_NEAREST)]
    png_dir, jpeg_dir, files_dir = (os.path.join(directory, n) for n in ("png", "jpeg", "files"))
    for d in (png_dir, jpeg_dir, files_dir):
        os.makedirs(d)
    writers = {fmt: tfrecord.ShardedWriter(d, "train", num_examples=count, num_shards=4)
               for fmt, d in (("png", png_dir), ("jpeg", jpeg_dir))}
    files = []
    for i in range(count):
        shift = int(rng.integers(0, width))
        image = np.roll(sources[i % len(sources)], shift, axis=1)
        mask = np.roll(mask_sources[i % len(mask_sources)], shift, axis=1)
        if i % 2:
            image, mask = image[:, ::-1], mask[:, ::-1]
        image_png = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))[1].tobytes()
        image_jpeg = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
        mask_png = cv2.imencode(".png", np.ascontiguousarray(mask))[1].tobytes()
        for fmt, encoded in (("png", image_png), ("jpeg", image_jpeg.tobytes())):
            writers[fmt].write(tfrecord.encode_example(encoded, fmt, mask_png, height, width, f"{i}.png"), i)
        paths = (os.path.join(files_dir, f"{i}_image.png"), os.path.join(files_dir, f"{i}_mask.png"))
        for path, encoded in zip(paths, (image_png, mask_png)):
            with open(path, "wb") as f:
                f.write(encoded)
        files.append(paths)
    common = {"label_space": "trainid", "num_classes": 19, "class_names": [str(c) for c in range(19)],
              "ignore_index": IGNORE_INDEX}
    for fmt, d in (("png", png_dir), ("jpeg", jpeg_dir)):
        writers[fmt].close()
        shards = writers[fmt].commit()
        size = sum(os.path.getsize(os.path.join(d, s)) for s in shards)
        print(f"  {fmt} shards: {count} examples, {size / count / 1e6:.2f} MB per example")
        tfrecord.write_dataset_info(d, tfrecord.merged_dataset_info(None, common, {
            "train": {"num_examples": count, "shards": shards}}))
    return png_dir, jpeg_dir, files


def section_fullres(args):
    batch = args.fullres_batch_size
    print(f"\n== full resolution 1024x2048, batch {batch}")
    directory = tempfile.mkdtemp(prefix="bench_fullres_")
    try:
        png_dir, jpeg_dir, files = synthetic_fullres(directory, args.fullres_examples)
        candidates = {
            "baseline: PIL PNG files + numpy/OpenCV": baseline_batches(load_png_files, files, batch),
            "keras_seg.data PNG shards + augment": pipeline_batches(png_dir, batch, (1024, 2048), shuffle_buffer=8),
            "keras_seg.data JPEG shards + augment": pipeline_batches(jpeg_dir, batch, (1024, 2048), shuffle_buffer=8),
            "baseline: PIL PNG files, no augment": baseline_batches(load_png_files, files, batch, augment=False),
            "keras_seg.data PNG shards, no augment": pipeline_batches(png_dir, batch, (1024, 2048), augment=False,
                                                                      shuffle_buffer=8),
            "keras_seg.data JPEG shards, no augment": pipeline_batches(jpeg_dir, batch, (1024, 2048), augment=False,
                                                                       shuffle_buffer=8),
        }
        compare(candidates, batch, args.fullres_seconds, args.rounds)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def section_wait(args):
    print(f"\n== data wait in a CPU training run: UNet at 256x256, batch {args.train_batch_size}, "
          f"{args.train_steps} steps, {args.pairs_tfr}")
    if not os.path.exists(os.path.join(args.pairs_tfr, tfrecord.DATASET_INFO_NAME)):
        print("  skipped: no converted pairs")
        return
    import keras

    try:
        from keras_seg.models.unet import build_unet

        model = build_unet(19, input_shape=(256, 256, 3), depth=4, base_filters=16)
    except Exception as err:  # the models issue not there yet: a small stand-in
        print(f"  (keras_seg.models.unet unavailable: {err}; a small conv net instead)")
        inputs = keras.Input((256, 256, 3))
        x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
        x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
        model = keras.Model(inputs, keras.layers.Conv2D(19, 1)(x))
    optimizer = keras.optimizers.Adam(1e-3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=IGNORE_INDEX)

    @tf.function
    def train_step(images, masks, seed):
        images, masks = augment_segmentation(images, masks, seed, CONFIG)
        with tf.GradientTape() as tape:
            loss = loss_fn(tf.cast(masks, tf.int32), model(images, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    ds = data.build_dataset(args.pairs_tfr, "train", training=True, batch_size=args.train_batch_size,
                            image_size=(256, 256), shuffle_seed=0, repeat=True)
    iterator = iter(ds)
    for step in range(3):  # tracing, autotuning, first fill of the buffers
        train_step(*next(iterator), tf.constant([1, step], tf.int64)).numpy()
    waited = 0.0
    start = time.perf_counter()
    for step in range(args.train_steps):
        before = time.perf_counter()
        images, masks = next(iterator)
        waited += time.perf_counter() - before
        train_step(images, masks, tf.constant([1, 100 + step], tf.int64)).numpy()
    total = time.perf_counter() - start
    print(f"  wall {total:.1f} s, {args.train_steps * args.train_batch_size / total:.1f} images/s trained, "
          f"waiting for data {waited:.2f} s = {100 * waited / total:.2f}% of wall time")


def section_gpu(args):
    print("\n== augmentation, batch of 8 at 512x1024: GPU vs CPU")
    if not tf.config.list_physical_devices("GPU"):
        print("  skipped: no GPU")
        return
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (8, 512, 1024, 3)).astype(np.float32)
    masks = rng.integers(0, 19, (8, 512, 1024)).astype(np.uint8)
    for device in ("/GPU:0", "/CPU:0"):
        with tf.device(device):
            x, y = tf.constant(images), tf.constant(masks)
            compiled = make_augment()
            for jit_step in range(3):
                compiled(x, y, tf.constant([0, jit_step], tf.int64))[1].numpy()
            times = []
            for step in range(args.gpu_steps):
                start = time.perf_counter()
                compiled(x, y, tf.constant([0, step], tf.int64))[1].numpy()
                times.append(time.perf_counter() - start)
        print(f"  {device}: {1000 * statistics.median(times):.1f} ms per batch (median of {args.gpu_steps})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="pairs,fullres,wait,gpu")
    parser.add_argument("--pairs-tfr", default="/tmp/pairs_tfr")
    parser.add_argument("--pairs-dir", default=os.path.join(SHARED, "cityscapes_pairs", "train"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=6.0, help="per candidate and round, 256x256 section")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fullres-examples", type=int, default=16)
    parser.add_argument("--fullres-batch-size", type=int, default=2)
    parser.add_argument("--fullres-seconds", type=float, default=6.0, help="per candidate and round")
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=12)
    parser.add_argument("--gpu-steps", type=int, default=20)
    args = parser.parse_args(argv)
    gpus = len(tf.config.list_physical_devices("GPU"))
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores, GPUs: {gpus}")
    sections = {"pairs": section_pairs, "fullres": section_fullres, "wait": section_wait, "gpu": section_gpu}
    for name in args.sections.split(","):
        sections[name.strip()](args)


if __name__ == "__main__":
    main()
