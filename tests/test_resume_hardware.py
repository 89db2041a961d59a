"""Resuming on other hardware (issue 20, item 4): a run continues only with the examples per step
and the precision it was trained with, and is refused in one line otherwise; a checkpoint that does
not match the model is an error, not a partial restore."""

import os
import subprocess
import sys
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seg import distribute
from keras_seg import train as train_cli
from keras_seg.training.trainer import Trainer
from test_train import REPO, make_config, tiny_data  # noqa: F401 (fixture)


@pytest.fixture(autouse=True)
def float32_after():
    yield
    keras.mixed_precision.set_dtype_policy("float32")


def resumed(run, *flags):
    argv = ["--output", str(run), "--resume", "--no-progress", *flags]
    return train_cli.resumed_config(str(run), train_cli.build_parser().parse_args(argv), argv)


# The training command on a machine of two devices: the CPU split in two before TensorFlow starts.
# (In a process of its own: one process cannot hold mirrored strategies of 2 and 3 devices with
# synchronized batch norm, and this test process has 3 logical CPUs.)
ON_TWO_DEVICES = """import sys, tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)
from keras_seg.train import command
sys.exit(command(sys.argv[1:]))
"""


@pytest.mark.slow  # 25 s on CPU-E (a trainer run)
def test_resume_with_fewer_replicas_is_refused_in_one_line(tiny_data, tmp_path):  # noqa: F811
    """Trained mirrored over every device of a 2-device machine (8 examples a step); resumed where the
    CPU is one device: one replica would read the stream at 4 a step and the run would go on silently."""
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO)
    first = subprocess.run([sys.executable, "-c", ON_TWO_DEVICES, "--preset", "unet_small", "--data", tiny_data,
                            "--output", str(run), "--image-size", "64x128", "--model-arg", "depth=3",
                            "--model-arg", "base_filters=8", "--batch-size", "4", "--precision", "float32",
                            "--strategy", "mirrored", "--iters", "1", "--no-export", "--no-progress"],
                           capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0 and "strategy mirrored x2 replicas" in first.stdout, first.stderr[-3000:]
    result = subprocess.run([sys.executable, "-m", "keras_seg.train", "--output", str(run), "--resume", "--iters", "2",
                             "--no-progress"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "2 replica(s), 8 examples a step" in errors[0] and "1 replica(s) make 4" in errors[0], errors[0]
    assert f"--init-from {run}" in errors[0]


def fake_turing_gpu(monkeypatch):
    """`--precision auto` as it resolves on a T4 (compute capability 7.5): mixed_float16."""
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: [SimpleNamespace(name="GPU:0")] if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "get_device_details", lambda _: {"compute_capability": (7, 5)})


@pytest.mark.slow  # 23 s on CPU-E (a trainer run)
def test_mixed_float16_run_resumed_elsewhere_refuses_auto_and_continues_with_its_precision(
        tiny_data, tmp_path, monkeypatch):  # noqa: F811
    """A mixed_float16 run (auto on a T4) stopped at step 2 of 4, resumed on a CPU where auto is
    float32: refused in one line naming the precision (today: a raw TensorFlow error from the restore).
    Resumed with --precision mixed_float16 it continues, with its loss scale, to the weights of the
    same run uninterrupted (item 14: a trainer run in mixed_float16, with a resume)."""
    flags = ("--iters", "4", "--precision", "auto", "--no-export", "--checkpoint-every", "2", "--val-every", "2")
    with monkeypatch.context() as gpu:
        fake_turing_gpu(gpu)
        whole = Trainer(make_config(tiny_data, tmp_path / "whole", *flags), log=lambda _: None)
        whole.run()
        assert whole.precision == "mixed_float16"
        expected = [w.copy() for w in whole.model.get_weights()]
        scale = float(whole.state.optimizer.dynamic_scale.numpy())

        def stop_after_step_2(line):
            if line.startswith("step 2/"):
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            Trainer(make_config(tiny_data, tmp_path / "part", *flags), log=stop_after_step_2).run()

    monkeypatch.setattr(distribute, "cpu_bfloat16", lambda: None)  # auto: float32 on this "CPU"
    with pytest.raises(ValueError) as refused:
        Trainer(resumed(tmp_path / "part")).run()
    message = str(refused.value)
    assert "\n" not in message and "trained in mixed_float16" in message and "gives float32" in message, message
    assert "--precision mixed_float16" in message

    trainer = Trainer(resumed(tmp_path / "part", "--precision", "mixed_float16"), log=lambda _: None)
    trainer.run()
    assert int(trainer.step.numpy()) == 4
    assert float(trainer.state.optimizer.dynamic_scale.numpy()) == scale
    for got, want in zip(trainer.model.get_weights(), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # 14 s on CPU-E (a trainer run)
def test_a_checkpoint_of_another_model_is_refused_not_partly_restored(tiny_data, tmp_path):  # noqa: F811
    """The run's checkpoints replaced by those of a deeper model: the restore names the checkpoint in
    one line (expect_partial() restored what matched and went on silently)."""
    run, other = tmp_path / "run", tmp_path / "other"
    Trainer(make_config(tiny_data, run, "--iters", "1", "--no-export"), log=lambda _: None).run()
    Trainer(make_config(tiny_data, other, "--iters", "1", "--no-export", "--model-arg", "depth=4"),
            log=lambda _: None).run()
    for name in os.listdir(run / "checkpoints"):
        os.remove(run / "checkpoints" / name)
    for name in os.listdir(other / "checkpoints"):
        (run / "checkpoints" / name).write_bytes((other / "checkpoints" / name).read_bytes())
    with pytest.raises(ValueError) as refused:
        Trainer(resumed(run, "--iters", "2")).run()
    message = str(refused.value)
    assert "\n" not in message and "does not restore into this run's model" in message, message
