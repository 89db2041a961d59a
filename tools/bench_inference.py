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
    """A run directory holding an untrained model of the unet_small preset (float32) at its input size."""
    from keras_seg.models.presets import get_preset

    return write_preset_run(directory, "unet_small", get_preset("unet_small")["input_size"])


# --------------------------------------------------------------------------- --deploy: every runtime of issue 21

DEPLOY_SETUPS = (("unet_small", None), ("unet_small", (512, 1024)), ("unet_mobilenetv3", None),
                 ("unet_mobilenetv3", (512, 1024)), ("deeplabv3plus_resnet50", None))
LITERT_VARIANTS = (("litert fp32", "none"), ("litert fp16", "fp16"), ("litert int8", "int8"))


def write_preset_run(directory: str, preset_name: str, size, data_dir: str | None = None) -> str:
    """A run directory holding an untrained model of a preset at `size` (its contract's input);
    `data_dir`: the data its int8 calibration draws from."""
    import keras

    from keras_seg.labels import cityscapes_label_space
    from keras_seg.models.presets import build_model, get_preset

    preset = get_preset(preset_name)
    keras.utils.set_random_seed(0)
    build_model(preset_name, 19, input_size=size).save(os.path.join(directory, "best.keras"))
    config = {"preset": preset_name, "model": preset["model"], "image_size": list(size),
              "resolved": {"precision": "float32"}}
    if data_dir is not None:
        config["data"] = data_dir
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(directory, "dataset_info.json"), "w") as f:
        json.dump({"source": "bench", **cityscapes_label_space("trainid").to_json()}, f)
    return directory


def file_megabytes(path: str) -> float:
    paths = [path, os.path.splitext(path)[0] + ".bin"] if path.endswith(".xml") else [path]
    if os.path.isdir(path):
        paths = [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p)) / 1e6


VARIANTS = ("keras (tf.function)", "savedmodel", *(name for name, _ in LITERT_VARIANTS), "onnxruntime",
            "openvino f32", "openvino bf16")


def export_deploy_variants(run: str, scratch: str, calibration: int, variants=VARIANTS) -> dict:
    """{variant: artifact path} of one run: the SavedModel, LiteRT fp32/fp16/int8, ONNX, OpenVINO
    (those of `variants`; the Keras model is the run's own)."""
    from keras_seg import export

    quiet = dict(log=lambda _: None)
    paths = {}
    if "savedmodel" in variants:
        paths["savedmodel"] = export.export_saved_model(run, os.path.join(scratch, "saved"), **quiet)
    for name, quantize in LITERT_VARIANTS:
        if name in variants:
            paths[name] = export.export_artifact(run, os.path.join(scratch, name.replace(" ", "-")), "litert",
                                                 quantize, calibration_images=calibration, **quiet)
    if "onnxruntime" in variants:
        paths["onnxruntime"] = export.export_artifact(run, os.path.join(scratch, "onnx"), "onnx", **quiet)
    if {"openvino f32", "openvino bf16"} & set(variants):
        paths["openvino f32"] = export.export_artifact(run, os.path.join(scratch, "openvino"), "openvino", **quiet)
        paths["openvino bf16"] = paths["openvino f32"]
    return paths


def time_deploy_variants(spec: dict, threads: int, repeats: int) -> dict:
    """ms per frame (batch 1, the bare model at its input size) of each variant, on `threads` threads.
    Each runtime is fed its own input type ready-made: only the model call is timed."""
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from keras_seg import runtimes
    from keras_seg.inference import load_run_model

    size = tuple(spec["size"])
    pixels = np.random.default_rng(0).integers(0, 256, (1, *size, 3)).astype(np.float32)
    unit = tf.constant(pixels / 255.0)
    calls = {}
    variants = spec.get("variants", VARIANTS)
    if "keras (tf.function)" in variants:
        model, _ = load_run_model(spec["run"])
        keras_call = tf.function(lambda x: model(x, training=False))
        calls["keras (tf.function)"] = lambda: keras_call(unit).numpy()
    if "savedmodel" in variants:
        bare = tf.saved_model.load(spec["paths"]["savedmodel"]).signatures["model_probabilities"]
        calls["savedmodel"] = lambda: bare(images=unit)["probabilities"].numpy()
    for name, _ in LITERT_VARIANTS:
        if name not in variants:
            continue
        runtime = runtimes.LiteRTRuntime(spec["paths"][name], threads)
        feed = pixels.astype(runtime.input["dtype"])
        interpreter, index, out = runtime.interpreter, runtime.input["index"], runtime.output["index"]

        def call(interpreter=interpreter, index=index, out=out, feed=feed):
            interpreter.set_tensor(index, feed)
            interpreter.invoke()
            return interpreter.get_tensor(out)

        calls[name] = call
    if "onnxruntime" in variants:
        ort = runtimes.OnnxRuntime(spec["paths"]["onnxruntime"], threads)
        calls["onnxruntime"] = lambda: ort.session.run([ort.output_name], {ort.input.name: pixels})[0]
    for precision in ("f32", "bf16"):
        if f"openvino {precision}" not in variants:
            continue
        ov = runtimes.OpenVINORuntime(spec["paths"][f"openvino {precision}"], threads, precision)
        calls[f"openvino {precision}"] = lambda ov=ov: ov.request.infer({0: pixels})
    return {name: 1000.0 * timed(call, repeats) for name, call in calls.items()}


def parse_setup(text: str) -> tuple:
    """"PRESET@HxW" -> (preset, (H, W)); "PRESET" -> (preset, None: its own input size)."""
    name, _, size = text.partition("@")
    return name, (tuple(int(v) for v in size.lower().split("x")) if size else None)


def deploy_benchmark(args) -> int:
    import subprocess

    from keras_seg import demo
    from keras_seg.models.presets import get_preset

    results = []
    print(f"load average before: {' '.join(f'{v:.1f}' for v in os.getloadavg())}; {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_deploy_") as scratch:
        data_dir = demo.write_demo_dataset(os.path.join(scratch, "data"), splits={"train": args.calibration},
                                           log=lambda _: None)
        setups = [parse_setup(setup) for setup in args.setups] if args.setups else DEPLOY_SETUPS
        for preset_name, size in setups:
            if args.presets and preset_name not in args.presets:
                continue
            size = tuple(size or get_preset(preset_name)["input_size"])
            where = os.path.join(scratch, f"{preset_name}-{size[0]}x{size[1]}")
            os.makedirs(os.path.join(where, "run"))
            run = write_preset_run(os.path.join(where, "run"), preset_name, size, data_dir)
            started = time.perf_counter()
            paths = export_deploy_variants(run, where, args.calibration, args.variants)
            spec = {"run": run, "size": list(size), "paths": paths, "variants": args.variants}
            spec_path = os.path.join(where, "spec.json")
            with open(spec_path, "w") as f:
                json.dump(spec, f)
            row = {"preset": preset_name, "size": list(size), "export_s": round(time.perf_counter() - started, 1),
                   "mb": {name: round(file_megabytes(path), 2) for name, path in paths.items()}, "ms": {}}
            for threads in args.threads:  # a process per thread count: TensorFlow fixes its pools at start-up
                done = subprocess.run([sys.executable, os.path.abspath(__file__), "--deploy-child", spec_path,
                                       "--threads", str(threads), "--repeats", str(args.repeats)],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    print(done.stderr[-2000:], file=sys.stderr)
                    return 1
                row["ms"][threads] = json.loads(done.stdout.strip().splitlines()[-1])
            row["loadavg"] = [round(v, 1) for v in os.getloadavg()]
            results.append(row)
            print(json.dumps(row), flush=True)
            if args.output:
                with open(args.output, "w") as f:
                    json.dump(results, f, indent=1)
    print(f"load average after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", default=DEFAULT_PHOTOS, help="folder searched for *.png photos")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per figure (after one warm-up)")
    parser.add_argument("--flip", action="store_true", help="also time sliding windows with flip averaging")
    parser.add_argument("--deploy", action="store_true",
                        help="instead: ms per frame of Keras, the SavedModel, LiteRT fp32/fp16/int8, ONNX Runtime and "
                             "OpenVINO f32/bf16 for unet_small, unet_mobilenetv3, deeplabv3plus_resnet50; file sizes")
    parser.add_argument("--presets", nargs="+", help="--deploy: only these presets")
    parser.add_argument("--setups", nargs="+", metavar="PRESET@HxW",
                        help="--deploy: these presets at these sizes instead of the default set, e.g. "
                             "ddrnet23_slim@512x1024 (issue 22's speed table: --variants savedmodel 'litert int8')")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="--deploy: the runtimes to time (default: all)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="--deploy: thread counts (default 1 2)")
    parser.add_argument("--calibration", type=int, default=8, help="--deploy: int8 calibration windows (default 8; "
                                                                   "latency does not depend on them)")
    parser.add_argument("--output", help="--deploy: write the rows to this JSON file as they come")
    parser.add_argument("--deploy-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.deploy_child:
        with open(args.deploy_child) as f:
            spec = json.load(f)
        print(json.dumps(time_deploy_variants(spec, args.threads[0], args.repeats)))
        return 0
    if args.deploy:
        return deploy_benchmark(args)
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
