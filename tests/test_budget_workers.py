"""--time-budget with several workers (issue 20, item 1): refused in one line. Each worker would plan its
length and validations from its own clock, and workers that end at different steps hang in a collective."""

import json

import pytest

from keras_seg import train as train_cli
from keras_seg.config import ConfigError, validate

from test_train import make_config, tiny_data  # noqa: F401, F811 (fixture)

TWO_WORKERS = json.dumps({"cluster": {"worker": ["localhost:1", "localhost:2"]},
                          "task": {"type": "worker", "index": 0}})


def test_validate_refuses_a_time_budget_with_multiworker(tiny_data, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match=r"^--time-budget cannot be used with --strategy multiworker"):
        make_config(tiny_data, tmp_path / "run", "--time-budget", "5", "--strategy", "multiworker")  # validates


def test_validate_refuses_a_time_budget_when_auto_finds_several_workers(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TF_CONFIG", TWO_WORKERS)
    with pytest.raises(ConfigError, match=r"^--time-budget cannot be used with --strategy multiworker"):
        make_config(tiny_data, tmp_path / "run", "--time-budget", "5", "--strategy", "auto")
    # one worker in TF_CONFIG is not a multi-worker run
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["localhost:1"]},
                                                "task": {"type": "worker", "index": 0}}))
    validate(make_config(tiny_data, tmp_path / "run", "--time-budget", "5", "--strategy", "auto"))


def test_the_command_line_refuses_the_pair_with_exit_code_2(tiny_data, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("TF_CONFIG", TWO_WORKERS)
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--preset", "unet_small", "--data", tiny_data, "--output", str(tmp_path / "run"),
                        "--strategy", "multiworker", "--time-budget", "5", "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("error: --time-budget cannot be used with --strategy multiworker")
    assert not (tmp_path / "run").exists()
