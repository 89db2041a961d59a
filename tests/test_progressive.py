"""Progressive resizing (`--progressive SHARE`, issue 32 item 3): the first part of the schedule at a
smaller size, then the preset's; image and mask stay aligned, and a resumed run continues in its phase."""

import keras
import numpy as np
import pytest

from keras_seg import data
from keras_seg.config import ConfigError, progressive_size
from keras_seg.training import setup
from keras_seg.training.trainer import Trainer

from test_train import make_config, tiny_data  # noqa: F401 (fixture)


@pytest.fixture(autouse=True)
def _restore_policy():
    yield
    keras.mixed_precision.set_dtype_policy("float32")


def test_the_first_size_is_the_scale_rounded_to_the_stride(tmp_path):
    config = make_config("unused", tmp_path / "run", "--iters", "10", "--image-size", "128x256", "--model-arg",
                         "depth=4", "--progressive", "0.7")  # unet_small: 2**4 x stem 2 = 32
    assert progressive_size(config) == [64, 128]
    config.progressive_scale = 0.6  # 76.8 -> 64, 153.6 -> 160
    assert progressive_size(config) == [64, 160]
    config.progressive_scale = 0.1  # never below one stride
    assert progressive_size(config) == [32, 32]
    config.resize_mode, config.base_scale, config.progressive_scale = "scale_crop", [512, 1024], 0.5
    assert setup.training_sizing(config, low=True)["base_scale"] == [256, 512]
    assert setup.training_sizing(config)["image_size"] == (128, 256)


@pytest.mark.parametrize("flags, message", [
    (["--progressive", "1.2"], "--progressive must be a share of the run in (0, 1)"),
    (["--progressive", "0.5", "--progressive-scale", "1"], "--progressive-scale must be in (0, 1)"),
    (["--progressive", "0.5", "--progressive-scale", "0.95"], "rounds back to it"),  # stride 16
    (["--progressive", "0.5", "--resize-mode", "fit"], "--resize-mode fit"),
])
def test_bad_progressive_settings_are_one_line_errors(tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_config("unused", tmp_path / "run", "--iters", "10", "--image-size", "64x128", *flags)


def test_masks_at_the_first_size_stay_on_their_pixels(tiny_data, tmp_path):  # noqa: F811
    """The reader halves the 64x128 scenes: each mask pixel is the original's at the centre it samples,
    (2i+1, 2j+1) (nearest, half-pixel centres), and the image's colour there is the same region's."""
    config = make_config(tiny_data, tmp_path / "run", "--iters", "10", "--progressive", "0.5")
    full, low = ([next(iter(data.build_dataset(tiny_data, "val", training=False, batch_size=8,
                                               **setup.training_sizing(config, low)))) for low in (False, True)])
    assert full[1].shape == (8, 64, 128) and low[1].shape == (8, 32, 64)
    np.testing.assert_array_equal(low[1].numpy(), full[1].numpy()[:, 1::2, 1::2])
    # Antialiased bilinear halving: each low pixel is close to the mean of the 2x2 block it covers.
    blocks = full[0].numpy().reshape(8, 32, 2, 64, 2, 3).mean(axis=(2, 4))
    assert np.median(np.abs(low[0].numpy() - blocks)) < 0.02


@pytest.mark.slow  # three trainer runs: 40 s on CPU-F
def test_a_progressive_run_switches_at_its_share_and_resumes_in_its_phase(tiny_data, tmp_path):  # noqa: F811
    """Warm-up 4, then linear over steps 4..20: progress 0.5 at step 12, so the 2-step calls switch to the
    full size at step 12. An uninterrupted run and one interrupted at step 8 (low size) and resumed end
    with the same weights; so does one interrupted at step 14 (full size)."""
    common = ["--iters", "20", "--val-every", "20", "--checkpoint-every", "2", "--steps-per-call", "2",
              "--warmup-iters", "4", "--schedule", "linear", "--progressive", "0.5", "--no-export"]
    lines = []
    whole = Trainer(make_config(tiny_data, tmp_path / "whole", *common), log=lines.append)
    whole.run()
    assert "progressive: from step 12 (progress 0.50 of 0.5) at 64x128" in lines, lines
    assert whole.train_model.input_shape == (None, None, None, 3)
    from keras_seg import train as train_cli

    for stop in (8, 14):
        run = tmp_path / f"stopped{stop}"
        trainer = Trainer(make_config(tiny_data, run, *common), log=lambda _: None)
        trainer.checkpoint = _stopping(trainer.checkpoint, stop)
        with pytest.raises(KeyboardInterrupt):
            trainer.run()
        args = train_cli.build_parser().parse_args(["--output", str(run), "--resume", "--no-progress"])
        resumed = Trainer(train_cli.resumed_config(str(run), args, []), log=lines.append)
        resumed.run()
        for a, b in zip(whole.model.get_weights(), resumed.model.get_weights()):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def _stopping(checkpoint, stop):
    """The trainer's checkpoint hook, interrupting the run right after the checkpoint of step `stop`."""
    def hook(step):
        checkpoint(step)
        if step == stop:
            raise KeyboardInterrupt
    return hook
