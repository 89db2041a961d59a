"""A trainer run with --jit (issue 20, item 14): XLA compiles the replica step, and 3 SGD steps reach
the weights of the same run without it."""

import numpy as np
import pytest

from keras_seg.training.trainer import Trainer
from test_train import make_config, tiny_data  # noqa: F401 (fixture)


@pytest.mark.slow  # 17 s on CPU-E (a trainer run); tests/test_augment.py::test_runs_under_xla stays
def test_a_jit_run_reaches_the_weights_of_the_run_without_xla(tiny_data, tmp_path):  # noqa: F811
    weights, lines = {}, []
    for jit in ("--no-jit", "--jit"):
        config = make_config(tiny_data, tmp_path / jit, "--iters", "3", "--no-augment", "--optimizer", "sgd",
                             "--learning-rate", "0.05", "--warmup-iters", "0", jit, "--no-export")
        trainer = Trainer(config, log=lines.append)
        trainer.run()
        weights[jit] = trainer.model.get_weights()
    assert not any("XLA is off" in line for line in lines)
    initial = Trainer(config, log=lines.append)
    initial.build()  # the same seed's initial weights: the runs moved away from them
    # The UNet's batch norm runs FusedBatchNormV3, compiled by XLA in one run and oneDNN's kernel in the
    # other: their reductions differ in order, and 3 steps at lr 0.05 carry that to ~5e-5 (CPU-F). Each
    # tensor must stay within that float tolerance and far closer to the other run than to its start.
    for a, b, a0 in zip(weights["--no-jit"], weights["--jit"], initial.model.get_weights(), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)
        assert np.abs(b - a).max() < 0.25 * np.abs(a - a0).max()
    assert max(np.abs(w - w0).max() for w, w0 in zip(weights["--jit"], initial.model.get_weights())) > 1e-3
