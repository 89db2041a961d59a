"""Deployment artifacts (LiteRT fp32/fp16/int8, ONNX, OpenVINO): logits against the Keras model,
the accuracy bounds of issue 21 on a briefly trained run, and the one-line errors."""

import builtins
import json
import os

import keras
import numpy as np
import pytest

from keras_seg import data, demo, evaluate, export, runtimes
from keras_seg.inference import load_run_model
from tiny_run import INPUT_SIZE, MODEL, write_run

DATA_SIZE = (96, 192)
ARTIFACTS = [("litert", "none"), ("litert", "fp16"), ("litert", "int8"), ("onnx", "none"), ("openvino", "none")]


def train_briefly(run_dir, data_dir, steps=200):
    """A tiny UNet trained `steps` steps on the demo data (resize mode), saved as the run's best.keras:
    its argmax is no longer degenerate, so an mIoU difference means something."""
    keras.utils.set_random_seed(11)
    dataset = data.build_dataset(data_dir, "train", training=True, batch_size=8, image_size=INPUT_SIZE,
                                 resize_mode="resize", repeat=True, shuffle_seed=1)
    model = keras.saving.load_model(os.path.join(run_dir, "best.keras"), compile=False)
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255))
    model.fit(dataset.map(lambda x, y: (x, y)), steps_per_epoch=steps, epochs=1, verbose=0)
    model.save(os.path.join(run_dir, "best.keras"))
    config_path = os.path.join(run_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["data"] = data_dir
    with open(config_path, "w") as f:
        json.dump(config, f)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    data_dir = demo.write_demo_dataset(str(root / "data"), splits={"train": 48, "val": 6}, size=DATA_SIZE,
                                       log=lambda _: None)
    run = write_run(root / "run")
    train_briefly(run, data_dir)
    paths = {}
    for fmt, quantize in ARTIFACTS:
        paths[fmt, quantize] = export.export_artifact(run, root / f"{fmt}-{quantize}", fmt, quantize,
                                                      calibration_images=100, log=lambda _: None)
    return {"root": root, "data": data_dir, "run": run, "artifacts": paths}


def val_windows(data_dir):
    """The val images stretched to the model's input (the run's contract), float32 pixels [N, h, w, 3]."""
    dataset = data.build_dataset(data_dir, "val", training=False, batch_size=64, image_size=INPUT_SIZE,
                                 resize_mode="resize")
    images, _ = next(iter(dataset))
    return images.numpy().astype(np.float32)


def keras_logits(run, pixels):
    model, _ = load_run_model(run)
    return model(pixels / 255.0, training=False).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["litert", "onnx", "openvino"])
def test_float32_artifacts_give_the_keras_logits(trained, fmt):
    pixels = np.concatenate([val_windows(trained["data"]),
                             np.random.default_rng(0).integers(0, 256, (2, *INPUT_SIZE, 3)).astype(np.float32)])
    expected = keras_logits(trained["run"], pixels)
    got = runtimes.load_runtime(trained["artifacts"][fmt, "none"]).logits(pixels)
    relative = np.abs(got - expected).max() / np.abs(expected).max()
    assert relative <= 1e-4, (fmt, relative)


@pytest.mark.slow
def test_fp16_litert_keeps_the_argmax(trained):
    pixels = val_windows(trained["data"])
    expected = keras_logits(trained["run"], pixels).argmax(-1)
    got = runtimes.load_runtime(trained["artifacts"]["litert", "fp16"]).logits(pixels).argmax(-1)
    agreement = np.mean(got == expected)
    assert agreement >= 0.999, agreement


def evaluate_miou(model, data_dir, output, *extra):
    assert evaluate.main(["--no-progress", "--model", str(model), "--data", data_dir, "--output", str(output),
                          *extra]) == 0
    return json.loads((output / "metrics.json").read_text())


@pytest.mark.slow
def test_every_artifact_scores_through_evaluate_within_its_bound(trained, capsys):
    root, data_dir = trained["root"], trained["data"]
    float_model = evaluate_miou(trained["run"], data_dir, root / "eval-run")
    assert float_model["miou"] > 0.25  # trained (40% after 200 steps): not the degenerate argmax of an untrained one
    scores = {}
    for (fmt, quantize), path in trained["artifacts"].items():
        report = evaluate_miou(path, data_dir, root / f"eval-{fmt}-{quantize}")
        assert report["images"] == float_model["images"]
        scores[f"{fmt}-{quantize}"] = report["miou"]
    with capsys.disabled():
        print(f"\nval mIoU (%): keras {100 * float_model['miou']:.2f}; "
              + "; ".join(f"{k} {100 * v:.2f}" for k, v in scores.items()))
    for name in ("litert-none", "onnx-none", "openvino-none"):
        assert abs(scores[name] - float_model["miou"]) <= 0.0005, (name, scores[name], float_model["miou"])
    assert abs(scores["litert-fp16"] - float_model["miou"]) <= 0.005
    assert float_model["miou"] - scores["litert-int8"] <= 0.015, (scores["litert-int8"], float_model["miou"])


@pytest.mark.slow
def test_artifact_runs_the_flip_contract_like_the_run(trained):
    """--flip through an artifact: the same averaged contract code, around the runtime's windows."""
    root, data_dir = trained["root"], trained["data"]
    run = evaluate_miou(trained["run"], data_dir, root / "flip-run", "--flip")
    onnx = evaluate_miou(trained["artifacts"]["onnx", "none"], data_dir, root / "flip-onnx", "--flip")
    assert abs(np.array(run["confusion_matrix"]) - np.array(onnx["confusion_matrix"])).sum() <= \
        0.001 * np.sum(run["confusion_matrix"])


@pytest.mark.slow
def test_labels_json_describes_the_artifact_as_its_runtime_reads_it(trained):
    for (fmt, quantize), path in trained["artifacts"].items():
        labels = json.loads((trained["root"] / f"{fmt}-{quantize}" / "labels.json").read_text())
        artifact = labels["artifact"]
        assert artifact["format"] == fmt and artifact["quantize"] == quantize
        assert os.path.basename(path) == artifact["file"]
        assert artifact["input"]["shape"] == [1, *INPUT_SIZE, 3]
        assert artifact["output"]["shape"] == [1, *INPUT_SIZE, 19]
        assert labels["num_classes"] == 19 and labels["inference"]["input_size"] == list(INPUT_SIZE)
    int8 = json.loads((trained["root"] / "litert-int8" / "labels.json").read_text())["artifact"]
    # uint8 pixels straight in: one pixel value is one quantized step
    assert int8["input"]["dtype"] == "uint8"
    assert int8["input"]["quantization"]["scale"] == pytest.approx(1.0, rel=1e-2)
    assert int8["input"]["quantization"]["zero_point"] == 0
    assert int8["ops"]["float_ops"] == {}  # full-integer: no op computes in float
    assert int8["calibration"]["windows"] == 48  # one window per training image (resize contract), all of them


def test_onnx_export_matches_keras_and_says_its_input(tmp_path):
    """The light representative in the default run: an untrained run through ONNX Runtime."""
    run = write_run(tmp_path / "run")
    path = export.export_artifact(run, tmp_path / "onnx", "onnx", log=lambda _: None)
    pixels = np.random.default_rng(1).integers(0, 256, (2, *INPUT_SIZE, 3)).astype(np.float32)
    model = keras.saving.load_model(os.path.join(run, "best.keras"), compile=False)
    expected = model(pixels / 255.0).numpy()
    got = runtimes.load_runtime(path).logits(pixels)
    assert np.abs(got - expected).max() / np.abs(expected).max() <= 1e-4
    labels = json.loads((tmp_path / "onnx" / "labels.json").read_text())
    assert labels["artifact"]["input"]["shape"] == [1, *INPUT_SIZE, 3] and MODEL["architecture"] == "unet"
    # The run records a whole contract padded to a multiple of its stride, as training does; the artifact's
    # one input size takes whole images padded up to it instead.
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["inference"]
    assert recorded["size_divisor"] == 8
    assert labels["inference"] == {key: value for key, value in recorded.items() if key != "size_divisor"}


def test_missing_runtime_is_one_line_naming_the_pip_install(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name.split(".")[0] == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    monkeypatch.delitem(__import__("sys").modules, "onnxruntime", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--run", str(tmp_path / "missing-run"), "--format", "onnx", "--output", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'keras-seg[onnx]'" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--format", "onnx", "--quantize", "int8"], "LiteRT only"),
    (["--quantize", "fp16"], "applies to --format litert"),
])
def test_quantize_outside_litert_is_refused(tmp_path, capsys, args, message):
    run = write_run(tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--run", run, "--output", str(tmp_path / "o"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


@pytest.mark.parametrize("args, message", [
    (["--format", "onnx", "--name", "street"], "--name applies to --format saved_model"),
    (["--format", "litert", "--version", "2"], "--version applies to --format saved_model"),
    (["--format", "openvino", "--name", "street", "--version", "2"], "--name applies to --format saved_model"),
    (["--format", "litert", "--calibration-images", "50"], "--calibration-images applies to --quantize int8"),
    (["--format", "litert", "--quantize", "fp16", "--calibration-data", "data"],
     "--calibration-data applies to --quantize int8"),
    (["--calibration-images", "50"], "--calibration-images applies to --quantize int8"),
])
def test_flags_the_export_would_ignore_are_refused(tmp_path, capsys, monkeypatch, args, message):
    """issue 31 item 7: --name/--version with an artifact format and calibration flags without int8 were
    silently ignored; now one line and exit 2, before any export starts."""
    def reached(*args, **kwargs):
        raise AssertionError("the export started")

    monkeypatch.setattr(export, "export_artifact", reached)
    monkeypatch.setattr(export, "export_saved_model", reached)
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--run", str(tmp_path / "run"), "--output", str(tmp_path / "o"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.parametrize("fmt, quantize", [("onnx", "none"), ("litert", "int8")])
def test_predict_runs_an_artifact_like_the_run(trained, fmt, quantize):
    """predict --model ARTIFACT over image files writes the run's masks: every pixel for float32 ONNX
    (99.9% allowed, the bound of its logits), at least 97% for int8 LiteRT (whose val mIoU is within 1.5
    points)."""
    import cv2

    from keras_seg import predict, tfrecord

    root = trained["root"]
    images = root / f"predict-images-{fmt}"
    images.mkdir()
    for shard in tfrecord.load_dataset_info(trained["data"])["splits"]["val"]["shards"]:
        for k, record in enumerate(tfrecord.read_records(os.path.join(trained["data"], shard))):
            image, _, _ = tfrecord.decode_arrays(record)
            cv2.imwrite(str(images / f"{shard[:-9]}-{k}.png"), image[..., ::-1])
    masks = {}
    for name, model in (("run", trained["run"]), (fmt, trained["artifacts"][fmt, quantize])):
        out = root / f"predict-{fmt}-{quantize}-{name}"
        assert predict.main(["--model", str(model), "--input", str(images), "--output", str(out),
                             "--no-progress"]) == 0
        masks[name] = {p: cv2.imread(str(out / p)) for p in sorted(os.listdir(out)) if p.endswith("_mask.png")}
    assert masks["run"] and list(masks["run"]) == list(masks[fmt])
    same = np.mean([np.all(masks["run"][p] == masks[fmt][p], axis=-1).mean() for p in masks["run"]])
    assert same >= (0.999 if quantize == "none" else 0.97), same


def test_the_score_command_export_prints_runs_as_written(tmp_path, capsys):
    """issue 31 item 11: export printed `evaluate --model PATH --data DIR`, which evaluate refuses (an exported
    model needs --output). The printed line, run as it is, scores the artifact on the run's data."""
    import shlex

    data_dir = demo.write_demo_dataset(str(tmp_path / "my data"), splits={"train": 1, "val": 1}, size=INPUT_SIZE,
                                       log=lambda _: None)
    run = write_run(tmp_path / "my run")
    config_path = os.path.join(run, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump(dict(config, data=data_dir), f)  # as training records it
    assert export.main(["--run", run, "--format", "onnx", "--output", str(tmp_path / "deploy")]) == 0
    printed = capsys.readouterr().out
    [line] = [line for line in printed.splitlines() if line.startswith("score it: ")]
    words = shlex.split(line[len("score it: "):])
    assert words[:3] == ["python", "-m", "keras_seg.evaluate"]
    assert evaluate.main(words[3:]) == 0
    output = words[words.index("--output") + 1]
    assert json.loads((tmp_path / output / "metrics.json").read_text())["images"] == 1
