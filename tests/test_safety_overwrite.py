"""`train --overwrite` replaces only a run directory or an empty one, and no --output may be, hold or lie
inside the data, or hold the file cache (issue 31 item 2): real folders, whose files must survive."""

import importlib
import os
import signal

import pytest

from keras_seg import demo
from keras_seg import train as train_cli


def snapshot(root):
    """Every file under `root` with its bytes."""
    files = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


@pytest.fixture
def fake_trainer(monkeypatch):
    """The Trainer replaced by one that records what it was given: these tests are about the directory."""
    started = []

    class Recorder:
        def __init__(self, config):
            self.config = config

        def run(self):
            started.append((self.config.output, sorted(os.listdir(self.config.output))
                            if os.path.isdir(self.config.output) else None))
            return {}

    monkeypatch.setattr(importlib.import_module("keras_seg.training.trainer"), "Trainer", Recorder)
    handler = signal.getsignal(signal.SIGTERM)  # main installs its own
    yield started
    signal.signal(signal.SIGTERM, handler)


@pytest.fixture
def user_files(tmp_path):
    """A converted data set, a folder of the user's runs and notes, and a file cache's directory."""
    data = demo.write_demo_dataset(str(tmp_path / "experiments" / "data"), splits={"train": 2, "val": 1},
                                   size=(32, 64), log=lambda _: None)
    runs = tmp_path / "experiments" / "runs"
    for name in ("a", "b"):
        (runs / name / "checkpoints").mkdir(parents=True)
        (runs / name / "config.json").write_text("{}")
        (runs / name / "best.keras").write_bytes(os.urandom(64))
    (runs / "notes.txt").write_text("which run was which")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "cs-train-64x128-resize-train-0of1.index").write_bytes(b"cached")
    return {"root": tmp_path, "data": data, "runs": runs, "cache": cache}


def train(data, output, *extra):
    return train_cli.main(["--preset", "unet_small", "--data", str(data), "--output", str(output), "--iters", "1",
                           "--no-progress", "--no-export", *extra])


@pytest.mark.parametrize("output, cache, message", [
    ("{data}", None, "is the --data directory"),
    ("{root}/experiments", None, "holds the --data directory"),
    ("{data}/run", None, "is inside the --data directory"),
    ("{runs}", None, "is not a run directory"),
    ("{cache}", "{cache}/cs", "is the --cache directory"),
    ("{root}", "{cache}/cs", "holds the --data directory"),
    ("{runs}/a/..", None, "is not a run directory"),
])
def test_user_files_survive_overwrite(user_files, fake_trainer, output, cache, message, capsys):
    before = snapshot(user_files["root"])
    output = output.format(**user_files)
    extra = ["--cache", cache.format(**user_files)] if cache else []
    with pytest.raises(SystemExit) as exit_info:
        train(user_files["data"], output, "--overwrite", *extra)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"error: --output {output} ") and err.count("\n") == 1, err
    assert message in err, err
    assert snapshot(user_files["root"]) == before and fake_trainer == []


def test_a_folder_holding_the_cache_is_refused_even_when_empty_of_data(tmp_path, user_files, fake_trainer, capsys):
    output = tmp_path / "run"
    (output / "cache").mkdir(parents=True)
    with pytest.raises(SystemExit):
        train(user_files["data"], output, "--cache", str(output / "cache" / "cs"))
    assert "holds the --cache directory" in capsys.readouterr().err and output.joinpath("cache").is_dir()


def test_a_run_directory_or_an_empty_one_is_replaced(user_files, fake_trainer):
    run = user_files["runs"] / "a"
    others = snapshot(user_files["runs"] / "b")
    assert train(user_files["data"], run, "--overwrite") == 0
    assert fake_trainer == [(str(run), None)]  # the old run was gone when training started (it makes the folder)
    assert snapshot(user_files["runs"] / "b") == others and (user_files["runs"] / "notes.txt").exists()
    empty = user_files["root"] / "empty"
    empty.mkdir()
    assert train(user_files["data"], empty, "--overwrite") == 0
    assert fake_trainer[-1] == (str(empty), [])
    # A folder below the cache's directory holds none of its files: allowed.
    assert train(user_files["data"], user_files["cache"] / "run", "--cache", str(user_files["cache"] / "cs")) == 0
    assert len(fake_trainer) == 3


def test_without_overwrite_a_run_directory_is_kept(user_files, fake_trainer, capsys):
    before = snapshot(user_files["runs"])
    with pytest.raises(SystemExit):
        train(user_files["data"], user_files["runs"] / "a")
    assert "exists and is not empty" in capsys.readouterr().err and snapshot(user_files["runs"]) == before
