"""Issue 22's real-time models: LR-ASPP over MobileNetV3-Large / -Small and DDRNet-23-slim.

Fidelity against the published figures (torchvision's parameter counts for LR-ASPP-Large, the DDRNet
paper's 5.7M parameters; compute is in test_realtime_flops.py), a local ImageNet file in the MobileNetV3
backbone, and each preset through the real trainer in mixed precision, its best.keras and its
SavedModel export."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seg import export
from keras_seg.models.ddrnet import build_ddrnet
from keras_seg.models.lraspp import build_lraspp
from keras_seg.training.trainer import Trainer

from test_finetune import make_config, quiet
from test_train import tiny_data  # noqa: F401 (fixture)


def trainable_parameters(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_variables)


@pytest.mark.parametrize("classes, expected", [(21, 3_221_538), (19, 3_221_198)])
def test_lraspp_large_has_torchvisions_parameter_count(classes, expected):
    # torchvision's lraspp_mobilenet_v3_large(num_classes=21): 3,221,538 trainable parameters.
    model = build_lraspp(classes, (64, 128, 3), encoder="mobilenetv3large")
    assert trainable_parameters(model) == expected


def test_lraspp_small_head_on_the_smalls_stride8_and_dilated_features():
    model = build_lraspp(19, (64, 128, 3), encoder="mobilenetv3small")
    assert model.get_layer("head_conv").input.shape[1:] == (4, 8, 576)  # stride 16, not 32: dilated
    assert model.get_layer("low_scores").input.shape[1:] == (8, 16, 24)  # the stride-8 block output
    # MobileNetV3-Small (927,008) + 576x128 + 256 (BN) + 576x128 (gate) + 24x19+19 + 128x19+19
    assert trainable_parameters(model) == 927_008 + 73_728 + 256 + 73_728 + 475 + 2_451


def test_ddrnet23_slim_parameters_within_2_percent_of_the_papers():
    model = build_ddrnet(19, (128, 256, 3))
    assert abs(trainable_parameters(model) / 5.7e6 - 1) < 0.02
    aux = build_ddrnet(19, (128, 256, 3), aux_weight=0.4, with_aux=True)
    assert len(aux.outputs) == 2 and trainable_parameters(aux) > trainable_parameters(model)


def test_a_local_imagenet_file_loads_into_the_lraspp_backbone(tmp_path):
    keras.utils.set_random_seed(5)
    source = keras.applications.MobileNetV3Large(include_top=False, weights=None, input_shape=(64, 128, 3))
    path = str(tmp_path / "mobilenetv3large.weights.h5")
    source.save_weights(path)
    model = build_lraspp(19, (64, 128, 3), encoder_weights=path)
    for name in ("conv", "expanded_conv_5_project", "expanded_conv_14_depthwise", "conv_1"):
        np.testing.assert_array_equal(model.get_layer(name).get_weights()[0], source.get_layer(name).get_weights()[0])


@pytest.mark.slow
@pytest.mark.parametrize("preset, extra", [
    ("lraspp_mobilenetv3_large", ["--encoder-weights", "none"]),
    ("lraspp_mobilenetv3_small", ["--encoder-weights", "none"]),
    ("ddrnet23_slim", []),
])
def test_realtime_preset_trains_in_mixed_precision_saves_and_exports(preset, extra, tiny_data, tmp_path):  # noqa: F811
    config = make_config(tiny_data, tmp_path / "run", "--preset", preset, *extra, "--precision", "mixed_bfloat16",
                         "--iters", "3", "--steps-per-call", "1", "--no-augment", "--no-export",
                         "--warmup-iters", "0", "--optimizer", "adam", "--learning-rate", "1e-3")
    trainer = Trainer(config, log=quiet)
    trainer.run()
    assert trainer.aux_weight == (0.4 if preset == "ddrnet23_slim" else 0.0)
    assert len(trainer.train_model.outputs) == (2 if preset == "ddrnet23_slim" else 1)
    first_conv = next(layer for layer in trainer.model.layers if isinstance(layer, keras.layers.Conv2D))
    assert first_conv.dtype_policy.name == "mixed_bfloat16"  # (preprocessing layers stay float32 by design)
    saved = keras.saving.load_model(tmp_path / "run" / "best.keras", compile=False)
    assert len(saved.outputs) == 1
    images = np.random.default_rng(0).random((2, 64, 128, 3), dtype=np.float32)
    logits = saved(images, training=False)
    assert logits.dtype == "float32" and logits.shape == (2, 64, 128, 19) and np.isfinite(logits).all()
    path = export.export_saved_model(str(tmp_path / "run"), str(tmp_path / "models"), log=lambda _: None)
    served = tf.saved_model.load(path)
    out = served.signatures["serving_default"]
    assert out is not None and os.path.isdir(path)
