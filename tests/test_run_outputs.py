"""What a run leaves when its end goes wrong, and under names a user can type (issue 31 item 1)."""

import os

import keras
import pytest

from keras_seg.training.trainer import Trainer

from test_train import make_config, tiny_data  # noqa: F401 (fixture)


@pytest.fixture(autouse=True)
def _restore_policy():
    yield
    keras.mixed_precision.set_dtype_policy("float32")


@pytest.mark.slow  # a trainer run with its export and report: 15 s on CPU-F
def test_a_run_named_with_a_plus_exports_and_reports(tiny_data, tmp_path):  # noqa: F811
    """A run in `ce+dice` trained to the end and then failed at the export, leaving no saved_model/ and
    no report.html: both are written now, the SavedModel under a name TF Serving takes."""
    run = tmp_path / "ce+dice"
    lines = []
    Trainer(make_config(tiny_data, run, "--iters", "2"), log=lines.append).run()
    assert (run / "saved_model" / "ce_dice" / "1" / "saved_model.pb").is_file(), lines
    assert (run / "report.html").is_file(), lines


@pytest.mark.slow  # a trainer run with its report: 13 s on CPU-F
def test_a_failed_export_costs_only_itself(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    """The export raises: the run says so in one line, and the report and the models are still written."""
    from keras_seg import export

    def failing_export(*args, **kwargs):
        raise export.ExportError("no room left on the device")

    monkeypatch.setattr(export, "export_saved_model", failing_export)
    run = tmp_path / "run"
    lines = []
    summary = Trainer(make_config(tiny_data, run, "--iters", "2"), log=lines.append).run()
    assert summary["steps"] == 2
    failed = [line for line in lines if line.startswith("export: not written")]
    assert failed == [f"export: not written (ExportError: no room left on the device); export it with python -m "
                      f"keras_seg.export --run {run} --output DIR"]
    assert (run / "report.html").is_file() and (run / "last.keras").is_file() and (run / "best.keras").is_file()
    assert not os.path.exists(run / "saved_model")


def test_the_dataset_info_copy_is_the_datas_bytes_and_replaces_a_damaged_one_whole(tmp_path, monkeypatch):
    """The run's dataset_info.json is published whole: a copy that fails part-way leaves the run's
    earlier file as it was, and no temporary file behind."""
    import shutil

    from keras_seg.run_dir import RunDir
    from keras_seg.training import outputs

    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    run.mkdir()
    source = b'{"num_classes": 19, "note": "\\u00e9 bytes kept as written"}\n'
    (data / "dataset_info.json").write_bytes(source)
    outputs.copy_dataset_info(RunDir(str(run)), str(data))
    assert (run / "dataset_info.json").read_bytes() == source

    def copy_half(src, dst):
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read()[:10])
        raise OSError("disk full")

    (data / "dataset_info.json").write_bytes(source.replace(b"19", b"21"))
    monkeypatch.setattr(shutil, "copyfile", copy_half)
    with pytest.raises(OSError, match="disk full"):
        outputs.copy_dataset_info(RunDir(str(run)), str(data))
    assert (run / "dataset_info.json").read_bytes() == source
    assert sorted(os.listdir(run)) == ["dataset_info.json"]
