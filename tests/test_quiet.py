"""A quiet start-up: no TensorFlow / absl / CUDA notices on stderr of a real command line; real warnings kept."""

import os
import subprocess
import sys

import pytest

from keras_seg import demo
from keras_seg.quiet import is_noise

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Lines TensorFlow 2.21 wrote at start-up on the machines this project is built on (no GPU).
STARTUP_NOISE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796182242.124449    8965 port.cc:153] oneDNN custom operations are on. You may see slightly "
    "different numerical results due to floating-point round-off errors from different computation orders.",
    "I0000 00:00:1796182242.125465    8965 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will "
    "not be used.",
    "E0000 00:00:1796183134.472547   19224 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed "
    "call to cuInit: UNKNOWN ERROR (303)",
]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "PYTHONWARNINGS")}
    env["PYTHONPATH"] = REPO
    return env


def _noise_in(stderr):
    return [line for line in stderr.splitlines()
            if is_noise(line) or any(word in line for word in ("absl", "cuda", "CUDA", "oneDNN", "I0000"))]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("quiet") / "data")
    demo.write_demo_dataset(directory, splits={"train": 4, "val": 2}, size=(64, 128), log=lambda _: None)
    return directory


@pytest.mark.slow  # 25 s on CPU-E (train + evaluate subprocesses); test_real_warnings_and_errors_still_show stays
def test_train_and_evaluate_start_quietly(demo_data, tmp_path):
    run = str(tmp_path / "run")
    trained = subprocess.run(
        [sys.executable, "-m", "keras_seg.train", "--preset", "unet_small", "--data", demo_data, "--output", run,
         "--iters", "2", "--no-progress", "--no-export", "--image-size", "64x128", "--batch-size", "2",
         "--model-arg", "base_filters=8", "--precision", "float32"],
        capture_output=True, text=True, timeout=300, env=_env(), cwd=str(tmp_path))
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "best val mIoU" in trained.stdout
    assert _noise_in(trained.stderr) == [], trained.stderr[-3000:]
    evaluated = subprocess.run(
        [sys.executable, "-m", "keras_seg.evaluate", "--model", run, "--data", demo_data, "--no-progress"],
        capture_output=True, text=True, timeout=300, env=_env(), cwd=str(tmp_path))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert _noise_in(evaluated.stderr) == [], evaluated.stderr[-3000:]
    # an error still shows, as one line
    failed = subprocess.run(
        [sys.executable, "-m", "keras_seg.evaluate", "--model", run, "--data", demo_data, "--split", "test"],
        capture_output=True, text=True, timeout=300, env=_env(), cwd=str(tmp_path))
    assert failed.returncode == 2 and failed.stderr.strip().splitlines() == [
        f"error: {demo_data}: no split 'test' (it has: ['train', 'val'])"]


REAL_LINES = r'''
import os, sys, warnings
from keras_seg.quiet import import_tensorflow, native_stderr_filtered
tf = import_tensorflow()
noise = sys.argv[1].split("\n")
with native_stderr_filtered():
    for line in noise:
        os.write(2, (line + "\n").encode())
    os.write(2, b"W0000 00:00:1.5 77 cpu_allocator_impl.cc:83] Allocation of 9999 exceeds 10% of free system memory.\n")
    warnings.warn("a real Python warning")
    os.write(2, b"E0000 00:00:1.5 77 some_kernel.cc:12] a real error from C++\n")
print("done")
'''


def test_real_warnings_and_errors_still_show():
    result = subprocess.run([sys.executable, "-c", REAL_LINES, "\n".join(STARTUP_NOISE)], capture_output=True,
                            text=True, timeout=120, env=_env())
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr
    lines = result.stderr.splitlines()
    assert not [line for line in lines if any(noise in line for noise in STARTUP_NOISE)], result.stderr
    assert any("exceeds 10% of free system memory" in line for line in lines)
    assert any("UserWarning: a real Python warning" in line for line in lines)
    assert any("a real error from C++" in line for line in lines)
