"""oneDNN: on by keras-seg's import wherever the user has not said otherwise, and the step's results
within float tolerance of TensorFlow's Eigen kernels on a fixed batch."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STATE = """
import json, os, keras_seg
from keras_seg.quiet import import_tensorflow
import_tensorflow()
from keras_seg.distribute import onednn_state
print(json.dumps({"variable": os.environ.get("TF_ENABLE_ONEDNN_OPTS"), **onednn_state()}))
"""

# Three SGD steps of unet_small's real step (keras_seg.training.bench) on one fixed batch; the weights after.
STEPS = """
import sys
import numpy as np
import keras_seg
from keras_seg.train import build_parser, resolve_config
from keras_seg.training.bench import FixedBatchStep
config = resolve_config(build_parser().parse_args([
    "--preset", "unet_small", "--data", "unused", "--precision", "float32", "--image-size", "64x128",
    "--optimizer", "sgd", "--learning-rate", "0.01", "--warmup-iters", "0", "--no-augment"]))
rng = np.random.default_rng(0)
images = np.round(rng.random((4, 64, 128, 3)) * 255).astype("float32") / 255
masks = rng.integers(0, 19, (4, 64, 128)).astype("uint8")
step = FixedBatchStep(config, images, masks, 19)
losses = [step() for _ in range(3)]
np.savez(sys.argv[1], losses=np.array(losses), *step.model.get_weights())
"""


def run(script, *args, onednn=None):
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    if onednn is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    result = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_keras_seg_turns_onednn_on_unless_the_user_said_otherwise():
    state = json.loads(run(STATE).strip().splitlines()[-1])
    assert state == {"variable": "1", "enabled": True, "why": "TF_ENABLE_ONEDNN_OPTS=1, keras-seg's default"}
    state = json.loads(run(STATE, onednn="0").strip().splitlines()[-1])
    assert state == {"variable": "0", "enabled": False, "why": "TF_ENABLE_ONEDNN_OPTS=0 in the environment"}


@pytest.mark.slow  # two processes build and step unet_small: 20 s on CPU-F
def test_the_step_with_onednn_matches_eigen_within_float_tolerance(tmp_path):
    results = {}
    for onednn in ("0", "1"):
        path = str(tmp_path / f"onednn{onednn}.npz")
        run(STEPS, path, onednn=onednn)
        results[onednn] = np.load(path)
    eigen, onednn = results["0"], results["1"]
    np.testing.assert_allclose(onednn["losses"], eigen["losses"], rtol=1e-4)
    assert eigen["losses"][2] < eigen["losses"][0]  # it trained
    names = [name for name in eigen.files if name != "losses"]
    assert names and names == [name for name in onednn.files if name != "losses"]
    for name in names:
        np.testing.assert_allclose(onednn[name], eigen[name], rtol=1e-3, atol=1e-5, err_msg=name)
    # Not the same kernels twice: the two paths sum in different orders.
    assert any(not np.array_equal(onednn[name], eigen[name]) for name in names)
