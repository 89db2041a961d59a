"""Validation scores in float32 whatever the training precision (issue 20, item 14): the number a
mixed-precision run reports is the number `evaluate` gives for the same weights."""

import json

import keras
import pytest

from keras_seg import evaluate
from keras_seg.training.trainer import Trainer
from test_train import make_config, read_history, tiny_data  # noqa: F401 (fixture)


@pytest.fixture(autouse=True)
def float32_after():
    yield
    keras.mixed_precision.set_dtype_policy("float32")


@pytest.mark.slow  # 8 s on CPU-E (a trainer run)
def test_a_mixed_bfloat16_run_validates_what_evaluate_scores(tiny_data, tmp_path):  # noqa: F811
    """6 bfloat16 steps from scratch (its softmax has near-ties: bfloat16's 8-bit mantissa moves some
    argmaxes); the last validation's mIoU equals evaluate's of last.keras (float32) to 1e-6."""
    run = tmp_path / "run"
    trainer = Trainer(make_config(tiny_data, run, "--iters", "6", "--val-every", "6", "--precision", "mixed_bfloat16",
                                  "--no-export"), log=lambda _: None)
    trainer.run()
    assert any(layer.compute_dtype == "bfloat16" for layer in trainer.model.layers)  # not a no-op
    validated = read_history(run)[-1]
    assert evaluate.main(["--no-progress", "--model", str(run / "last.keras"), "--data", tiny_data, "--output",
                          str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert float(validated["val_miou"]) == pytest.approx(evaluated["miou"], abs=1e-6)
    assert float(validated["val_pixel_accuracy"]) == pytest.approx(evaluated["pixel_accuracy"], abs=1e-6)
