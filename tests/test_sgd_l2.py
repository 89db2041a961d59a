"""L2 weight decay as PyTorch's SGD applies it (issue 20, item 6), against hand-computed updates.

torch.optim.SGD(lr, momentum=mu, weight_decay=wd), dampening 0: d = g + wd * w; buf = d on the first
step, buf = mu * buf + d after; w -= lr * buf. MMSegmentation clips (when it does) before `step()`,
so wd * w joins the clipped gradient.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from test_finetune import initial_model, make_config, run
from test_train import tiny_data  # noqa: F401 (fixture)

from keras_seg.config import TrainConfig
from keras_seg.recipes import get_recipe
from keras_seg.replicas import apply_global_gradients
from keras_seg.training.step import build_optimizer

LR, MU, WD = 0.01, 0.9, 5e-4


def torch_sgd(w, grads, clipnorm=None):
    """PyTorch's SGD steps in numpy, clipping each gradient (global norm) before the decay joins it."""
    w, buf = [x.astype(np.float64) for x in w], None
    for g in grads:
        if clipnorm:
            norm = np.sqrt(sum((x.astype(np.float64) ** 2).sum() for x in g))
            g = [x * min(1.0, clipnorm / norm) for x in g]
        d = [gi + WD * wi for gi, wi in zip(g, w)]
        buf = d if buf is None else [MU * b + di for b, di in zip(buf, d)]
        w = [wi - LR * b for wi, b in zip(w, buf)]
    return w


def run_steps(config, w0, grads, clipnorm=None):
    variables = [keras.Variable(x, name=f"w{i}") for i, x in enumerate(w0)]
    optimizer = build_optimizer(config, LR, variables, clip=False)
    optimizer.build(variables)
    decay = config.weight_decay if config.weight_decay_mode == "l2" else 0.0
    for g in grads:
        apply_global_gradients(optimizer, [tf.constant(x) for x in g], variables, clipnorm, l2_decay=decay)
    return [v.numpy() for v in variables]


def test_recipe_sgd_matches_pytorch_l2_including_biases():
    recipe = get_recipe("cityscapes_fullres")
    assert recipe["weight_decay_mode"] == "l2" and recipe["weight_decay"] == WD and recipe["momentum"] == MU
    config = TrainConfig(optimizer="sgd", learning_rate=LR, momentum=MU, weight_decay=WD, weight_decay_mode="l2")
    rng = np.random.default_rng(0)
    w0 = [rng.normal(size=(3, 3, 2, 4)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32)]  # kernel, bias
    grads = [[rng.normal(size=x.shape).astype(np.float32) * 0.01 for x in w0] for _ in range(3)]
    got = run_steps(config, w0, grads)
    want = torch_sgd(w0, grads)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)
    # the decay's share is visible: 10x Keras' decoupled lr * wd * w by the third step
    decoupled = run_steps(TrainConfig(optimizer="sgd", learning_rate=LR, momentum=MU, weight_decay=WD), w0, grads)
    assert np.abs(decoupled[0] - want[0]).max() > 1e-5


def test_l2_joins_the_gradient_after_clipping():
    config = TrainConfig(optimizer="sgd", learning_rate=LR, momentum=MU, weight_decay=WD, weight_decay_mode="l2")
    w0 = [np.full((2, 2), 3.0, np.float32)]
    grads = [[np.full((2, 2), 10.0, np.float32)], [np.full((2, 2), -4.0, np.float32)]]
    got = run_steps(config, w0, grads, clipnorm=1.0)
    np.testing.assert_allclose(got[0], torch_sgd(w0, grads, clipnorm=1.0)[0], rtol=0, atol=1e-6)


def test_recipe_photometric_is_mmsegmentations():
    from keras_seg.augment import AugmentConfig, augment_segmentation

    augment = get_recipe("cityscapes_fullres")["augment"]
    assert augment["hue_delta"] * 360 == 36.0  # hue_delta=18 of OpenCV's 0-180 hue
    # contrast as MMSeg's convert(img, alpha): a plain multiplication, clipped (not about the mean)
    config = AugmentConfig.disabled(**{**{k: v for k, v in augment.items() if not k.endswith("_prob")},
                                       "contrast_prob": 1.0, "contrast_range": (1.5, 1.5)})
    image = np.linspace(0.0, 0.9, 4 * 4 * 3, dtype=np.float32).reshape(1, 4, 4, 3)
    out, _ = augment_segmentation(image, np.zeros((1, 4, 4), np.int32), tf.constant([1, 2]), config)
    np.testing.assert_allclose(out.numpy(), np.clip(image * 1.5, 0.0, 1.0), rtol=0, atol=1e-6)


@pytest.mark.slow  # 12 s on CPU-E (a trainer run); the optimizer-level tests stay
def test_trainer_step_adds_l2_to_every_gradient(tiny_data, tmp_path):  # noqa: F811
    """One SGD step of the trainer with and without L2 from the same weights and batch differ by -lr * wd * w0
    in every trainable variable (biases and batch-norm parameters included), as torch's first step does."""
    common = ["--preset", "unet_small", "--iters", "1", "--steps-per-call", "1", "--no-augment", "--no-export",
              "--warmup-iters", "0", "--optimizer", "sgd", "--momentum", "0.9", "--schedule", "constant",
              "--weight-decay-mode", "l2"]
    start = [v.numpy() for v in initial_model(make_config(tiny_data, tmp_path / "x", *common)).trainable_variables]
    with_l2 = run(make_config(tiny_data, tmp_path / "l2", *common, "--weight-decay", "0.05"))
    without = run(make_config(tiny_data, tmp_path / "none", *common, "--weight-decay", "0"))
    lr = float(with_l2.schedule(0))
    for w0, a, b in zip(start, with_l2.train_model.trainable_variables, without.train_model.trainable_variables):
        np.testing.assert_allclose(a.numpy() - b.numpy(), -lr * 0.05 * w0, rtol=1e-3, atol=1e-6)
