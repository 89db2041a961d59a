"""Bad data met mid-run: a truncated shard (a half-copied file) ends training and evaluation with one line
naming the shard and the byte offset of the damaged record; `predict --skip-bad` skips unreadable images."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from test_train import REPO, make_config
from tiny_run import write_run

from keras_seg import demo, predict, tfrecord
from keras_seg import evaluate as evaluate_cli
from keras_seg.training.trainer import Trainer

CUT_BYTES = 100  # cut off the end of the shard's last record


def _truncate_last_shard(directory, split):
    """Cuts the end off the split's last shard; returns (its path, the byte offset of its last record)."""
    info = tfrecord.load_dataset_info(directory)
    path = os.path.join(directory, info["splits"][split]["shards"][-1])
    records = [r.numpy() for r in tf.data.TFRecordDataset(path)]
    assert len(records) >= 2  # the first record stays whole: start-up's check passes
    # TFRecord framing: 8-byte length + 4-byte CRC, the record, 4-byte CRC.
    offset = sum(len(r) + 16 for r in records[:-1])
    assert os.path.getsize(path) == offset + len(records[-1]) + 16
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - CUT_BYTES)
    return path, offset


@pytest.fixture(scope="module")
def intact_data(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("bad") / "data")
    demo.write_demo_dataset(directory, splits={"train": 8, "val": 4}, size=(64, 128), log=lambda _: None)
    return directory


@pytest.fixture
def data_copy(intact_data, tmp_path):
    directory = str(tmp_path / "data")
    shutil.copytree(intact_data, directory)
    return directory


@pytest.mark.slow  # about 9 s on CPU-D; the evaluate test below is the light one in the default run
def test_training_names_the_truncated_shard(data_copy, tmp_path):
    path, offset = _truncate_last_shard(data_copy, "train")
    run = tmp_path / "run"
    config = make_config(data_copy, run, "--iters", "2", "--no-export")
    with pytest.raises(tfrecord.DatasetFormatError) as caught:
        Trainer(config, log=lambda _: None).run()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: truncated record at byte {offset} "), message
    assert "make_tfrecords" in message and "--overwrite" in message


def test_evaluate_names_the_truncated_shard(data_copy, tmp_path, capsys):
    path, offset = _truncate_last_shard(data_copy, "val")
    run = write_run(tmp_path / "run")
    with pytest.raises(SystemExit) as caught:
        evaluate_cli.main(["--model", run, "--data", data_copy, "--split", "val", "--no-progress",
                           "--output", str(tmp_path / "eval")])
    assert caught.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: truncated record at byte {offset} "), lines
    assert "make_tfrecords" in lines[0]


@pytest.mark.slow
def test_training_command_after_a_checkpoint_ends_in_one_line(data_copy, tmp_path):
    """The command line: a run checkpoints, its shard is then damaged; continuing it ends in one line
    naming the shard and the checkpoint --resume continues from, no traceback, and the checkpoint survives."""
    run = str(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "PYTHONWARNINGS")}
    env["PYTHONPATH"] = REPO
    base = [sys.executable, "-m", "keras_seg.train", "--preset", "unet_small", "--data", data_copy, "--output", run,
            "--no-progress", "--no-export", "--image-size", "64x128", "--batch-size", "4", "--model-arg",
            "base_filters=8", "--model-arg", "depth=3", "--precision", "float32", "--strategy", "one"]
    first = subprocess.run(base + ["--iters", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    path, offset = _truncate_last_shard(data_copy, "train")
    resumed = subprocess.run(base + ["--iters", "6", "--resume"], capture_output=True, text=True, timeout=300,
                             env=env)
    assert resumed.returncode != 0
    assert "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    last = resumed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {path}: truncated record at byte {offset} "), resumed.stderr[-3000:]
    assert "--resume" in last and "step 2" in last
    assert tf.train.latest_checkpoint(os.path.join(run, "checkpoints")).endswith("-2")


def test_predict_skip_bad_lists_and_writes_the_rest(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    import cv2

    for name in ("a.png", "c.png"):
        cv2.imwrite(str(photos / name), rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    (photos / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n half a file")
    out = tmp_path / "out"
    # the default stops at the first unreadable image, naming it
    with pytest.raises(SystemExit) as caught:
        predict.main(["--model", run, "--input", str(photos), "--output", str(out), "--no-progress"])
    assert caught.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {photos / 'b.png'}: not an image (or a corrupt one): expected a PNG or JPEG file"]
    assert predict.main(["--model", run, "--input", str(photos), "--output", str(out), "--no-progress",
                         "--skip-bad", "--overwrite"]) == 0
    captured = capsys.readouterr()
    assert f"skipped {photos / 'b.png'}: not an image" in captured.err
    assert "skipped 1 unreadable image" in captured.out
    for stem in ("a", "c"):
        assert (out / f"{stem}_mask.png").is_file() and (out / f"{stem}_panel.png").is_file()
    assert not [p for p in os.listdir(out) if p.startswith("b_")]
