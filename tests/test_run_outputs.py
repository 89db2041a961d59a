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
