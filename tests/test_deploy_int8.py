"""int8 LiteRT calibration and input (issue 31 items 5, 6, 7, 10): the input is raw uint8 pixels at scale 1,
zero point 0 whatever the calibration images; calibration streams the split, sees the windows the artifact
sees, and names a damaged shard in one line."""

import json
import os

import cv2
import numpy as np
import pytest

from keras_seg import demo, export, tfrecord
from keras_seg.inference import load_run_model
from keras_seg.labels import cityscapes_label_space
from tiny_run import INPUT_SIZE, write_run

DARK = 119 / 255  # the darkest calibration set of the issue: brightest pixel 119, input scale 0.467 before


def quiet(_):
    pass


def scenes(count, size=INPUT_SIZE, brightness=1.0, seed=0):
    """Demo street scenes (RGB uint8), their pixels scaled by `brightness`, and their masks."""
    rng = np.random.default_rng(seed)
    drawn = [demo.draw_scene(rng, size) for _ in range(count)]
    return [(np.round(image * brightness).astype(np.uint8), mask) for image, mask in drawn]


def write_records(directory, examples, num_shards=1, split="train"):
    """A dataset directory of `examples` (image, mask) as lossless PNG records in `num_shards` shards;
    returns its path."""
    os.makedirs(directory, exist_ok=True)
    writer = tfrecord.ShardedWriter(str(directory), split, num_examples=len(examples), num_shards=num_shards)
    for position, (image, mask) in enumerate(examples):
        png = cv2.imencode(".png", image[:, :, ::-1])[1].tobytes()
        writer.write(tfrecord.encode_example(png, "png", cv2.imencode(".png", mask)[1].tobytes(), *image.shape[:2],
                                             f"{split}/{position}"), position)
    writer.close()
    shards = writer.commit()
    sizes = {}
    for image, _ in examples:
        key = f"{image.shape[0]}x{image.shape[1]}"
        sizes[key] = sizes.get(key, 0) + 1
    split_info = {"num_examples": len(examples), "shards": shards, "image_sizes": sizes,
                  "image_formats": {"png": len(examples)}, "skipped": []}
    space = cityscapes_label_space("trainid")
    tfrecord.write_dataset_info(str(directory), tfrecord.merged_dataset_info(
        None, {"source": "test", **space.to_json()}, {split: split_info}))
    return str(directory)


def litert_logits(path, pixels):
    """The .tflite's dequantized logits for uint8 pixels fed as they are, as docs/deploy.md's client does."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    results = []
    for image in pixels:
        interpreter.set_tensor(inp["index"], image[None].astype(inp["dtype"]))
        interpreter.invoke()
        scale, zero = out["quantization"]
        results.append((interpreter.get_tensor(out["index"]).astype(np.float32) - zero) * scale)
    return np.concatenate(results), inp["quantization"]


@pytest.fixture(scope="module")
def dark(tmp_path_factory):
    root = tmp_path_factory.mktemp("dark")
    return {"run": write_run(root / "run"), "data": write_records(root / "data", scenes(8, brightness=DARK)),
            "held_out": np.stack([image for image, _ in scenes(2, brightness=DARK, seed=1)])}


def test_int8_input_is_raw_pixels_after_calibration_on_dark_images(dark, tmp_path):
    """Calibrated on images whose brightest pixel is 119, the input scale was 119/255 = 0.467: a client
    feeding raw pixels (docs/deploy.md) fed them 2.1x too bright."""
    path = export.export_artifact(dark["run"], tmp_path / "int8", "litert", "int8", calibration_images=8,
                                  calibration_data=dark["data"], log=quiet)
    pixels = dark["held_out"]
    logits, input_quantization = litert_logits(path, pixels)
    assert input_quantization == (1.0, 0)
    described = json.loads((tmp_path / "int8" / "labels.json").read_text())["artifact"]["input"]
    assert described["dtype"] == "uint8" and described["quantization"]["scale"] == 1.0
    assert described["quantization"]["zero_point"] == 0
    model, _ = load_run_model(dark["run"])
    expected = model(pixels.astype(np.float32) / 255.0).numpy()
    error = np.sqrt(np.mean((logits - expected) ** 2))
    assert error < 0.1 * np.std(expected), (error, np.std(expected))  # 2.1x too bright: about 1x the spread


def test_an_input_the_converter_did_not_pin_is_refused(dark, tmp_path, monkeypatch):
    """If the pinned range does not reach the file (here: a range of 0..119 given in its place), export
    stops with one line and writes nothing."""
    monkeypatch.setattr(export, "PIXEL_RANGE", (0.0, 119.0))
    with pytest.raises(export.ExportError, match="scale 1, zero point 0") as err:
        export.export_artifact(dark["run"], tmp_path / "int8", "litert", "int8", calibration_images=2,
                               calibration_data=dark["data"], log=quiet)
    assert "\n" not in str(err.value)
    assert not os.path.exists(tmp_path / "int8" / "model.tflite")
