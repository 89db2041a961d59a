"""Latency of inference on 2048x1024 Cityscapes photos on this machine's CPU.

With a model of the `unet_small` preset's architecture (128x256 input, 19 classes; untrained
weights: latency does not depend on them), exported by `keras_seg.export`:

  serving_default     the exported SavedModel, loaded with tf.saved_model.load, one image per call
                      as encoded bytes (the photo's PNG, and the same pixels as JPEG quality 90):
                      decode, resize to 128x256 (the run's contract), predict, softmax resized back
                      to 2048x1024, arg-max
  segment_uint8       the same on decoded pixels: the share of the decoding
  slide               the contract of a run trained on crops: sliding 128x256 windows with 1/3 overlap
                      over the photo at full resolution (Keras model, float32)
  predict             per image in the command's loop: read the PNG, infer by the contract, write mask,
                      overlay and panel

Each figure is the median of `--repeats` timed calls after one warm-up call. Other work on the
machine slows every figure alike; the load average is printed before and after.

    python tools/bench_inference.py [--photos ../shared/data/cityscapes_fullres_nogt] [--repeats 5] [--flip]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PHOTOS = os.path.join(os.path.dirname(REPO), "shared", "data", "cityscapes_fullres_nogt")


def timed(function, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_unet_small_run(directory: str) -> str:
    """A run directory holding an untrained model of the unet_small preset (float32)."""
    import keras

    from keras_seg.labels import cityscapes_label_space
    from keras_seg.models.presets import build_model, get_preset

    preset = get_preset("unet_small")
    keras.utils.set_random_seed(0)
    build_model("unet_small", 19).save(os.path.join(directory, "best.keras"))
    config = {"preset": "unet_small", "model": preset["model"], "image_size": list(preset["input_size"]),
              "resolved": {"precision": "float32"}}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(directory, "dataset_info.json"), "w") as f:
        json.dump({"source": "bench", **cityscapes_label_space("trainid").to_json()}, f)
    return directory


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", default=DEFAULT_PHOTOS, help="folder searched for *.png photos")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per figure (after one warm-up)")
    parser.add_argument("--flip", action="store_true", help="also time sliding windows with flip averaging")
    args = parser.parse_args(argv)
    photos = sorted(glob.glob(os.path.join(args.photos, "**", "*.png"), recursive=True))
    if not photos:
        parser.exit(2, f"error: no .png photos under {args.photos}\n")

    import tensorflow as tf

    from keras_seg import export, inference, predict

    print(f"load average before: {' '.join(f'{v:.1f}' for v in os.getloadavg())}; "
          f"{os.cpu_count()} CPUs; TensorFlow {tf.__version__}")
    png = open(photos[0], "rb").read()
    image = predict.read_image(photos[0])
    jpeg = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    print(f"photo: {photos[0]} ({image.shape[1]}x{image.shape[0]}, PNG {len(png) / 1e6:.1f} MB, "
          f"JPEG q90 {len(jpeg) / 1e6:.2f} MB)")

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as scratch:
        run = os.path.join(scratch, "unet_small")
        os.makedirs(run)
        write_unet_small_run(run)
        saved = export.export_saved_model(run, os.path.join(scratch, "models"), log=lambda _: None)
        loaded = tf.saved_model.load(saved)
        serve = loaded.signatures["serving_default"]
        segment = loaded.signatures["segment_uint8"]
        for label, payload in (("PNG", png), ("JPEG q90", jpeg)):
            request = tf.constant([payload])
            seconds = timed(lambda request=request: serve(images=request)["class_ids"].numpy(), args.repeats)
            rows.append((f"serving_default, {label} bytes (resize mode)", seconds))
        pixels = tf.constant(image[None])
        rows.append(("segment_uint8, decoded pixels (resize mode)",
                     timed(lambda: segment(images=pixels)["class_ids"].numpy(), args.repeats)))

        from keras_seg import contract

        segmenter = inference.load_segmenter(run)
        tile = tuple(segmenter.input_size)
        sliding = contract.InferenceContract("none", None, "slide", tile)
        slide = tf.function(lambda x, flip: contract.contract_probabilities(
            x, segmenter.model_function, sliding, segmenter.num_classes, flip=flip), reduce_retracing=True)
        flips = (False, True) if args.flip else (False,)
        for flip in flips:
            seconds = timed(lambda flip=flip: slide(tf.constant(image[None]), flip).numpy(), args.repeats)
            rows.append((f"slide, {tile[0]}x{tile[1]} tiles, overlap 1/3{', flip' if flip else ''} (Keras, float32)",
                         seconds))
        out = os.path.join(scratch, "out")

        def predict_one():
            photo = predict.read_image(photos[0])
            prediction = segmenter.predict(photo)
            paths = [os.path.join(out, f"p_{suffix}.png") for suffix in ("mask", "overlay", "panel")]
            predict.write_outputs(paths, photo, prediction.class_ids, segmenter, "color")

        rows.append(("predict per image (read, infer by the contract, write 3 PNGs)", timed(predict_one, args.repeats)))

    width = max(len(name) for name, _ in rows)
    print(f"\n{'path':<{width}}  seconds / 2048x1024 image (median of {args.repeats})")
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds:7.3f}")
    print(f"\nload average after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
