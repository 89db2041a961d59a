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


class Calibrated(BaseException):
    """Raised in place of the conversion, with the calibration windows export computed."""


def windows_export_calibrates_on(monkeypatch, run, data_dir, count):
    """The windows `export_artifact` hands the converter for int8 (the conversion itself is skipped)."""
    def stop(quantize, windows=None):
        raise Calibrated(windows)

    monkeypatch.setattr(export, "litert_options", stop)
    with pytest.raises(Calibrated) as caught:
        export.export_artifact(run, os.path.join(os.path.dirname(data_dir), "int8"), "litert", "int8",
                               calibration_images=count, calibration_data=data_dir, log=quiet)
    return caught.value.args[0]


def test_calibration_does_not_read_the_split_before_its_first_window(tmp_path, monkeypatch):
    """issue 31 item 6: a 4,096-record shuffle buffer read the whole split (every record of all three shards
    here) before the first window; now the shards' order is shuffled and a small buffer mixes their records."""
    import tensorflow as tf

    run = write_run(tmp_path / "run")
    data_dir = write_records(tmp_path / "data", scenes(300, size=(8, 16)), num_shards=3)
    real, read = tf.data.TFRecordDataset, []

    def counted(*args, **kwargs):  # every record read from a file passes through `count`
        def count(record):
            read.append(1)
            return record

        return real(*args, **kwargs).map(lambda r: tf.ensure_shape(tf.py_function(count, [r], tf.string), []))

    monkeypatch.setattr(tf.data, "TFRecordDataset", counted)
    windows = windows_export_calibrates_on(monkeypatch, run, data_dir, count=1)
    assert len(windows) == 1
    assert 0 < len(read) <= 100, len(read)  # of 300


def test_calibration_windows_are_those_the_artifact_sees(tmp_path, monkeypatch):
    """issue 31 item 7: a "fit" run's artifact pads an image centred in its box (as training's letterbox);
    calibration padded it at the bottom / right. A 64x64 image in a 64x128 box: columns 32..95."""
    run = write_run(tmp_path / "run")
    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    config.update(resize_mode="fit", inference={"resize": "fit", "scale": [64, 128], "mode": "whole",
                                                "input_size": [64, 128], "overlap": 1 / 3, "size_divisor": 8})
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(config, f)
    [(image, mask)] = scenes(1, size=(64, 64))
    data_dir = write_records(tmp_path / "data", [(image, mask)])
    [window] = windows_export_calibrates_on(monkeypatch, run, data_dir, count=5)
    expected = np.zeros((64, 128, 3), np.float32)
    expected[:, 32:96] = image
    np.testing.assert_array_equal(window, expected)


def test_a_damaged_shard_met_in_calibration_is_one_line_naming_it(dark, tmp_path, capsys):
    """issue 31 item 10: the int8 calibration's read of a damaged shard was a DataLossError traceback."""
    data_dir = write_records(tmp_path / "data", scenes(6, seed=2), num_shards=2)
    shard = os.path.join(data_dir, tfrecord.load_dataset_info(data_dir)["splits"]["train"]["shards"][-1])
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)  # a half-copied file
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--run", dark["run"], "--format", "litert", "--quantize", "int8", "--calibration-data", data_dir,
                     "--output", str(tmp_path / "int8")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: int8 calibration: {shard}: truncated record"), err
    assert not os.path.exists(tmp_path / "int8" / "model.tflite")
