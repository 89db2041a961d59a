"""history.csv is rewritten whole on resume (issue 20, item 14): a failure mid-rewrite keeps the old file."""

import csv

import pytest

from keras_seg import run_dir
from keras_seg.run_dir import HISTORY_COLUMNS, History


def write_rows(path, steps):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        for step in steps:
            writer.writerow({k: step if k == "step" else 0.5 for k in HISTORY_COLUMNS})


def test_a_resume_killed_while_rewriting_the_history_keeps_it(tmp_path, monkeypatch):
    path = tmp_path / "history.csv"
    write_rows(path, [10, 20, 30])
    before = path.read_text()

    class KilledWriter(csv.DictWriter):
        def writerow(self, row):
            raise KeyboardInterrupt  # the kill, after the header, before the kept rows

    monkeypatch.setattr(run_dir.csv, "DictWriter", KilledWriter)
    with pytest.raises(KeyboardInterrupt):
        History(str(path), keep_until_step=20)
    assert path.read_text() == before  # truncated to its header before the fix


def test_a_resume_keeps_the_rows_up_to_its_step_and_appends(tmp_path):
    path = tmp_path / "history.csv"
    write_rows(path, [10, 20, 30])
    history = History(str(path), keep_until_step=20)
    history.append({k: 40 if k == "step" else 0.25 for k in HISTORY_COLUMNS})
    history.close()
    with open(path, newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [10, 20, 40]
    assert not (tmp_path / "history.csv.partial").exists()
