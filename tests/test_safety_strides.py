"""Config validation refuses every input size the model's builder would refuse (issue 31 item 8): the
multiple it checks is each builder's own, and a wrong size is one line before the run directory exists."""

import sys

import pytest

from keras_seg import train as train_cli
from keras_seg.config import ConfigError, model_stride
from keras_seg.models.presets import PRESETS, build_model, builder_for


class _Checked(Exception):
    def __init__(self, stride):
        super().__init__(stride)
        self.stride = stride


def builder_multiple(model_config, monkeypatch) -> int:
    """The multiple the builder itself checks: its call of `check_input_size`, caught before any layer."""
    module = sys.modules[builder_for(model_config).__module__]

    def caught(input_shape, stride, architecture):
        raise _Checked(stride)

    monkeypatch.setattr(module, "check_input_size", caught)
    with pytest.raises(_Checked) as checked:
        build_model({"model": model_config, "input_size": (None, None)}, num_classes=2)
    monkeypatch.undo()
    return checked.value.stride


MODELS = {name: entry["model"] for name, entry in PRESETS.items()}
MODELS["unet depth 3"] = {**PRESETS["unet_silu"]["model"], "depth": 3}
MODELS["unet depth 3, stride-2 stem"] = {**PRESETS["unet_small"]["model"], "depth": 3}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_config_stride_is_the_builders_own(name, monkeypatch):
    assert model_stride(MODELS[name]) == builder_multiple(MODELS[name], monkeypatch)


@pytest.mark.parametrize("preset, size, stride", [
    ("ddrnet23_slim_cpu", "96x160", 64),  # multiples of 32, not of 64: DDRNet's stride-64 DAPPM input
    ("unet_resnet50", "48x80", 32),  # multiples of 16 (a 4-level U-Net's) but the encoder's is 32
])
def test_a_size_the_model_cannot_take_is_one_line_before_the_run_directory(preset, size, stride, tmp_path,
                                                                            capsys):
    args = train_cli.build_parser().parse_args(["--preset", preset, "--image-size", size])
    with pytest.raises(ConfigError, match=f"multiples of {stride}"):
        train_cli.resolve_config(args)
    output = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--preset", preset, "--image-size", size, "--output", str(output)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --image-size {size}") and err.count("\n") == 1, err
    assert not output.exists()
