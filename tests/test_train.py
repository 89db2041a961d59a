"""Training end to end on CPU: overfitting, the run directory, resume, tf.distribute, precision."""

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from contract_reference import keras_probabilities, numpy_confusion, reference_probabilities
from keras_seg import demo, evaluate, tfrecord
from keras_seg import train as train_cli
from keras_seg.models.presets import get_preset
from keras_seg.training.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _restore_policy():
    yield
    keras.mixed_precision.set_dtype_policy("float32")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """8 demo scenes at 64x128, stored as train and (the same shards) as val: a set to overfit."""
    return write_tiny_data(str(tmp_path_factory.mktemp("tiny") / "data"))


def write_tiny_data(directory):
    demo.write_demo_dataset(directory, splits={"train": 8}, size=(64, 128), log=lambda _: None)
    info = tfrecord.load_dataset_info(directory)
    val = dict(info["splits"]["train"], shards=[])
    for name in info["splits"]["train"]["shards"]:
        val["shards"].append(name.replace("train-", "val-"))
        shutil.copy(os.path.join(directory, name), os.path.join(directory, val["shards"][-1]))
    info["splits"]["val"] = val
    tfrecord.write_dataset_info(directory, info)
    return directory


def make_config(data, output, *extra):
    args = train_cli.build_parser().parse_args(
        ["--preset", "unet_small", "--data", data, "--output", str(output), "--no-progress",
         "--image-size", "64x128", "--model-arg", "depth=3", "--model-arg", "base_filters=8",
         "--batch-size", "4", "--val-batch-size", "4", "--precision", "float32", "--strategy", "one",
         "--cache", "memory", "--seed", "1", *extra]
    )
    config = train_cli.resolve_config(args)
    config.output = str(output)
    config.provenance = {"command": "test"}
    return config


def read_history(run):
    with open(os.path.join(run, "history.csv"), newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_tiny_model_overfits_a_handful_of_images(tiny_data, tmp_path):
    run = tmp_path / "run"
    config = make_config(tiny_data, run, "--epochs", "6", "--steps-per-epoch", "25", "--no-augment",
                         "--model-arg", "base_filters=16", "--learning-rate", "0.003", "--warmup-epochs", "0",
                         "--patience", "0")
    summary = Trainer(config, log=lambda _: None).run()
    history = read_history(run)
    losses = [float(r["loss"]) for r in history]
    assert losses[-1] < 0.3 * losses[0]
    assert float(history[-1]["train_miou"]) > 0.55, history[-1]
    # val holds the same images, seen through the batch-norm moving statistics, which lag behind
    # after 150 steps; still far above the ~0.05 of an untrained model
    assert summary["miou"] > 0.25, summary["miou"]
    # the run directory a person reads
    for name in ("config.json", "dataset_info.json", "history.csv", "best.keras", "last.keras",
                 "best_per_class_iou.txt", "best_metrics.json", "samples.png"):
        assert (run / name).is_file(), name
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(run / "logs"))
    assert (run / "saved_model" / "run" / "1" / "saved_model.pb").is_file()
    assert tf.train.latest_checkpoint(str(run / "checkpoints")).endswith("ckpt-150")  # named by the step
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["seed"] == 1 and recorded["model"]["depth"] == 3
    table = (run / "best_per_class_iou.txt").read_text()
    assert "road" in table and "IoU" in table
    best = json.loads((run / "best_metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"JSON has {c}"))
    assert best["miou"] == max(float(r["val_miou"]) for r in history)
    # the best checkpoint is the best epoch's model: re-evaluating it gives the recorded mIoU
    model = keras.saving.load_model(run / "best.keras", compile=False)
    images, masks = [], []
    for record in tfrecord.read_records(os.path.join(tiny_data, "train-00000-of-00002.tfrecord")) + \
            tfrecord.read_records(os.path.join(tiny_data, "train-00001-of-00002.tfrecord")):
        image, mask, _ = tfrecord.decode_arrays(record)
        images.append(image / 255.0)
        masks.append(mask)
    predictions = np.argmax(model.predict(np.stack(images), verbose=0), -1)
    truth = np.stack(masks)
    valid = truth != 255
    ious = []
    for c in range(19):
        inter = np.sum((predictions == c) & (truth == c) & valid)
        union = np.sum(((predictions == c) | (truth == c)) & valid)
        if union:
            ious.append(inter / union)
    assert abs(np.mean(ious) - best["miou"]) < 1e-3


@pytest.fixture(scope="module")
def ignore_data(tmp_path_factory):
    """12 demo scenes whose masks ignore a growing share of rows (0/12 ... 11/12), so that the
    replicas' parts of a batch hold very different counts of valid pixels."""
    directory = str(tmp_path_factory.mktemp("ignore") / "data")
    demo.write_demo_dataset(directory, splits={"train": 12, "val": 4}, size=(64, 128), log=lambda _: None)
    for shard in tfrecord.existing_shards(directory, "train"):
        path = os.path.join(directory, shard)
        records = []
        for record in tfrecord.read_records(path):
            image, mask, name = tfrecord.decode_arrays(record)
            index = int(name.rsplit("/", 1)[1])
            mask = mask.copy()
            mask[: 64 * index // 12] = 255
            png = lambda a: cv2.imencode(".png", a)[1].tobytes()  # noqa: E731
            records.append(tfrecord.encode_example(png(image[:, :, ::-1]), "png", png(mask), 64, 128, name))
        with tfrecord.RecordFileWriter(path) as writer:
            for record in records:
                writer.write(record)
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [2, 3])
def test_mirrored_replicas_train_the_one_device_model(ignore_data, tmp_path, replicas):
    """A global batch of 6 as 2 x 3 or 3 x 2 replicas gives the weights of one device with batch 6:
    SGD (an update is lr x gradient, so a gradient off by a factor shows), clipping by a global
    norm the gradients exceed, CE + Dice with class weights (normalised by global valid-pixel counts
    and Dice sums), masks whose ignored share differs between the replicas' parts, batch norm."""
    weights, losses = {}, {}
    for strategy, batch in (("one", "6"), ("mirrored", str(6 // replicas))):
        extra = ["--devices", str(replicas)] if strategy == "mirrored" else []
        # SiLU, not the preset's ReLU: ReLU's gradient jumps at 0, so a pre-activation within float
        # round-off of 0 (batch-norm sums in another order across replicas) flips a unit on or off.
        # Each run in a process of its own, from the command line: the logical CPUs are set up
        # there (--devices), and one process cannot hold mirrored strategies of 2 and 3 devices
        # with synchronized batch norm (their collective groups clash).
        command = [sys.executable, "-m", "keras_seg.train", "--preset", "unet_small", "--data", ignore_data,
                   "--output", str(tmp_path / strategy), "--no-progress", "--image-size", "64x128",
                   "--model-arg", "depth=3", "--model-arg", "base_filters=8", "--model-arg", "activation=silu",
                   "--precision", "float32", "--seed", "1", "--no-augment", "--strategy", strategy, *extra,
                   "--batch-size", batch, "--iters", "3", "--clipnorm", "0.5", "--optimizer", "sgd", "--momentum", "0",
                   "--learning-rate", "0.05", "--warmup-iters", "0", "--loss", "ce+dice", "--class-weights", "enet",
                   "--no-export"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                                env=dict(os.environ, PYTHONPATH=REPO))
        assert result.returncode == 0, result.stderr[-3000:]
        if strategy == "mirrored":
            assert f"strategy mirrored x{replicas} replicas, global batch 6" in result.stdout, result.stdout
        weights[strategy] = keras.saving.load_model(tmp_path / strategy / "last.keras", compile=False).get_weights()
        losses[strategy] = float(read_history(tmp_path / strategy)[0]["loss"])
    assert losses["mirrored"] == pytest.approx(losses["one"], rel=1e-5)
    for a, b in zip(weights["one"], weights["mirrored"]):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # 12 s on CPU-E (a trainer run)
def test_crop_trained_run_validates_as_evaluate_and_an_independent_computation(tmp_path, capsys):
    """A scale_crop run (64x128 crops of 96x192 images): its last validation, `evaluate`'s default on the
    same weights, and a numpy computation of the contract (sliding windows over the whole image at its
    base scale, scored at the original resolution) give one mIoU."""
    data = str(tmp_path / "data")
    demo.write_demo_dataset(data, splits={"train": 8, "val": 3}, size=(96, 192), log=lambda _: None)
    run = tmp_path / "run"
    config = make_config(data, run, "--iters", "6", "--val-every", "3", "--resize-mode", "scale_crop",
                         "--base-scale", "96x192", "--ratio-range", "0.75,1.5", "--cat-max-ratio", "0.75")
    assert config.augment["scale_prob"] == 0.0  # the preset's on-device scale gives way to the reader's
    Trainer(config, log=lambda _: None).run()
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["inference"] == {"resize": "keep_ratio", "scale": [96, 192], "mode": "slide",
                                     "input_size": [64, 128], "overlap": 1 / 3}
    last_validation = float(read_history(run)[-1]["val_miou"])

    assert evaluate.main(["--no-progress", "--model", str(run / "last.keras"), "--data", data, "--output",
                          str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["miou"]

    model_fn = keras_probabilities(keras.saving.load_model(run / "last.keras", compile=False))
    masks, predictions = [], []
    for shard in tfrecord.load_dataset_info(data)["splits"]["val"]["shards"]:
        for record in tfrecord.read_records(os.path.join(data, shard)):
            image, mask, _ = tfrecord.decode_arrays(record)
            probabilities = reference_probabilities(image, model_fn, "keep_ratio", (96, 192), (64, 128))
            predictions.append(probabilities.argmax(-1))
            masks.append(mask)
    cm = numpy_confusion(masks, predictions).astype(float)
    union = cm.sum(0) + cm.sum(1) - np.diag(cm)
    independent = np.nanmean(np.where(union > 0, np.diag(cm) / np.maximum(union, 1), np.nan))
    assert abs(last_validation - evaluated) < 1e-4, (last_validation, evaluated)
    assert abs(evaluated - independent) < 1e-4, (evaluated, independent)


@pytest.mark.parametrize("recipe, crop, base_scale, inference", [
    ("cityscapes_fullres", [512, 1024], [1024, 2048], {"resize": "keep_ratio", "scale": [1024, 2048], "mode": "whole",
                                                       "input_size": [1024, 2048], "overlap": 1 / 3}),
    ("voc_fullres", [512, 512], [512, 2048], {"resize": "keep_ratio", "scale": [512, 2048], "mode": "slide",
                                              "input_size": [512, 512], "overlap": 1 / 3}),
])
def test_full_resolution_recipes_resolve_over_any_preset(tiny_data, recipe, crop, base_scale, inference):
    # Each model's total down-sampling, by hand: 2**4 pools; 2**4 after a stride-2 stem; the encoders' 2**5.
    # "whole" contracts record it (any multiple of it runs), "slide" ones run fixed windows.
    total_stride = {"unet_silu": 16, "unet_small": 32, "deeplabv3plus_resnet50": 32, "unet_mobilenetv3": 32}
    for preset, stride in total_stride.items():
        args = train_cli.build_parser().parse_args(["--preset", preset, "--recipe", recipe, "--data", tiny_data,
                                                    "--iters", "100"])
        config = train_cli.resolve_config(args)
        expected = {**inference, "size_divisor": stride} if inference["mode"] == "whole" else inference
        assert (config.image_size, config.base_scale, config.inference) == (crop, base_scale, expected)
        assert (config.optimizer, config.learning_rate, config.schedule) == ("sgd", 0.01, "poly")
        assert config.scale_lr_to_batch == 8 and config.augment["scale_prob"] == 0.0 and config.recipe == recipe
        assert config.iters == 100  # the command line still has the last word
        assert config.model == get_preset(preset)["model"]  # the preset's model


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multiworker_two_local_processes_agree(tiny_data, tmp_path):
    outputs = _run_workers(tiny_data, tmp_path / "run", [tmp_path / "chief.log", tmp_path / "worker.log"],
                           "--iters", "2")
    assert "strategy multiworker x2 replicas" in outputs[0], outputs[0][-3000:]
    fingerprints = [re.findall(r"^weights fingerprint ([0-9a-f]{16})", out, re.M) for out in outputs]
    assert fingerprints[0] and fingerprints[0] == fingerprints[1], outputs[0][-2000:]
    # only the chief wrote the run directory
    assert (tmp_path / "run" / "best.keras").is_file()


@pytest.mark.parametrize("args,message", [
    (["--preset", "nope"], "invalid choice: 'nope'"),
    (["--data", "/nonexistent/dir"], "--data: /nonexistent/dir: no such directory"),
    (["--image-size", "100x200"], "multiples of 16"),
    (["--loss", "ce+bogus"], "--loss:"),
    (["--augment", "flip_prob=2"], "--augment: flip_prob must be in [0, 1]"),
    (["--model-arg", "base_filter=8"], "--model-arg base_filter: not an argument of the unet builder"),
    (["--plateau-patience", "0"], "--plateau-patience must be >= 1, got 0"),
    (["--plateau-factor", "1.5"], "--plateau-factor must be < 1"),
    (["--time-limit", "30"], "--time-limit was replaced by --time-budget MINUTES"),
    (["--max-steps", "30"], "--max-steps was replaced by --iters N"),
    (["--iters", "10", "--epochs", "2"], "choose one of --iters, --epochs, --time-budget"),
    (["--nesterov"], "--nesterov applies to --optimizer sgd only"),
    (["--strategy", "tpu"], "--strategy tpu is not supported: the confusion-matrix metrics count pixels in a float64"),
    (["--devices", "2"], "--devices applies to --strategy mirrored only"),
    (["--resize-mode", "scale_crop"], "--resize-mode scale_crop needs --base-scale HxW"),
    (["--recipe", "voc_fullres"], "--recipe voc_fullres is for the full-resolution data set: give --data DIR"),
    (["--resize-mode", "scale_crop", "--base-scale", "64x128", "--augment", "scale_range=0.5,2"],
     "--augment scale_range: with --resize-mode scale_crop the reader draws the scale"),
    (["--base-scale", "64x128"], "--base-scale and --inference-mode apply to --resize-mode scale_crop only"),
    (["--resize-mode", "scale_crop", "--base-scale", "64x128", "--ratio-range", "2,1"], "--ratio-range must be"),
    (["--resize-mode", "scale_crop", "--base-scale", "64x128", "--cat-max-ratio", "1.5"], "--cat-max-ratio must be"),
])
def test_bad_values_are_one_line_errors(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--output", str(tmp_path / "r"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "r").exists()


def test_command_line_error_exit_code(tmp_path):
    result = subprocess.run([sys.executable, "-m", "keras_seg.train", "--data", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: --data: {tmp_path}: no dataset_info.json: not a " \
                                                     "dataset written by tools/make_tfrecords.py"
    assert "Traceback" not in result.stderr


def _start_workers(tiny_data, run, logs, *extra):
    """Two local workers of one MultiWorkerMirroredStrategy run, each in a process group of its own."""
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    processes = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
                   PYTHONPATH=REPO)
        command = [sys.executable, "-m", "keras_seg.train", "--preset", "unet_small", "--data", tiny_data,
                   "--output", str(run), "--no-progress", "--no-export", "--image-size", "64x128",
                   "--model-arg", "depth=3", "--model-arg", "base_filters=8", "--batch-size", "2",
                   "--precision", "float32", "--strategy", "multiworker", *extra]
        log = open(logs[index], "w")
        processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                          start_new_session=True))
    return processes


def _run_workers(tiny_data, run, logs, *extra):
    """`_start_workers`, waited for (each must succeed within 240 s); returns their outputs."""
    processes = _start_workers(tiny_data, run, logs, *extra)
    try:
        for process, log in zip(processes, logs):
            assert process.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        _kill_all(processes)
    return [log.read_text() for log in logs]


def _kill_all(processes):
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.slow
def test_multiworker_run_resumes_after_a_worker_is_killed(tiny_data, tmp_path):
    """Two local workers; worker 1 is killed (its process group) mid-run, the chief then stalls in a
    collective and is stopped; both restart with --resume and restore the chief's checkpoint: the
    same step, the same weights as that checkpoint's, and the same weights at the end."""
    run = tmp_path / "run"
    logs = [tmp_path / "chief.log", tmp_path / "worker.log"]
    cadence = ["--iters", "24", "--checkpoint-every", "4", "--val-every", "12", "--steps-per-call", "1"]
    processes = _start_workers(tiny_data, run, logs, *cadence)
    try:
        deadline = time.time() + 240
        while int((tf.train.latest_checkpoint(str(run / "checkpoints")) or "-0").rsplit("-", 1)[1]) < 8:
            assert all(p.poll() is None for p in processes), logs[0].read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint at step 8 in time"
            time.sleep(0.05)
        os.killpg(processes[1].pid, signal.SIGKILL)
        try:
            processes[0].wait(timeout=30)  # the chief may notice, or hang in a collective
        except subprocess.TimeoutExpired:
            pass
    finally:
        _kill_all(processes)
    step = int(tf.train.latest_checkpoint(str(run / "checkpoints")).rsplit("-", 1)[1])
    assert 8 <= step < 24
    saved = re.findall(rf"checkpoint step {step} weights fingerprint ([0-9a-f]{{16}})", logs[0].read_text())
    assert saved, logs[0].read_text()[-3000:]

    outputs = _run_workers(tiny_data, run, [tmp_path / "chief2.log", tmp_path / "worker2.log"], *cadence, "--resume")
    for out in outputs:
        restored = re.search(r"resuming \S+ at step (\d+) \(.*weights fingerprint ([0-9a-f]{16})\)", out)
        assert restored, out[-3000:]
        assert int(restored[1]) == step and restored[2] == saved[-1]
    final = [re.findall(r"^weights fingerprint ([0-9a-f]{16})", out, re.M) for out in outputs]
    assert final[0] and final[0] == final[1]
