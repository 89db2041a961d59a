"""issue 31 item 4: an artifact and its labels.json are one export. A second export into a folder that
holds one is refused without --overwrite; a model file that is not the one labels.json was written with
(another export's, or one of OpenVINO's two files replaced by an interrupted export) is refused on load,
in one line naming both files, by the loader that evaluate and predict use."""

import json
import os
import shutil

import cv2
import numpy as np
import pytest

from keras_seg import demo, evaluate, export, inference, predict
from tiny_run import write_run


def quiet(_):
    pass


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two runs of one architecture, different weights (as two trainings give), each exported to ONNX,
    a small val split and a photo."""
    root = tmp_path_factory.mktemp("binding")
    runs = {name: write_run(root / name, seed=seed) for name, seed in (("a", 3), ("b", 4))}
    exports = {name: export.export_artifact(run, root / f"onnx-{name}", "onnx", log=quiet)
               for name, run in runs.items()}
    data_dir = demo.write_demo_dataset(str(root / "data"), splits={"val": 1}, size=(64, 128), log=quiet)
    photos = root / "photos"
    photos.mkdir()
    cv2.imwrite(str(photos / "scene.png"), demo.draw_scene(np.random.default_rng(0), (64, 128))[0])
    return {"root": root, "runs": runs, "exports": exports, "data": data_dir, "photos": photos}


def test_a_second_export_into_a_folder_holding_one_is_refused(two_runs, tmp_path):
    folder = tmp_path / "deploy"
    shutil.copytree(two_runs["root"] / "onnx-a", folder)
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    with pytest.raises(export.ExportError, match="already holds an export") as err:
        export.export_artifact(two_runs["runs"]["b"], folder, "litert", log=quiet)
    assert str(folder) in str(err.value) and "--overwrite" in str(err.value)
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before  # nothing touched


def test_overwrite_replaces_the_whole_export(two_runs, tmp_path):
    folder = tmp_path / "deploy"
    shutil.copytree(two_runs["root"] / "onnx-a", folder)
    path = export.export_artifact(two_runs["runs"]["b"], folder, "litert", overwrite=True, log=quiet)
    assert sorted(os.listdir(folder)) == ["labels.json", "model.tflite"]  # the replaced ONNX file went with it
    segmenter = inference.load_segmenter(path)
    assert segmenter.kind == "litert"


def mixed_folder(two_runs, tmp_path):
    """Run a's export with run b's model file in place of its own: what a kill between the model's move
    and the labels' write, or a copy by hand, leaves."""
    folder = tmp_path / "mixed"
    shutil.copytree(two_runs["root"] / "onnx-a", folder)
    shutil.copy(two_runs["root"] / "onnx-b" / "model.onnx", folder / "model.onnx")
    return folder


def test_a_model_beside_another_exports_labels_is_refused_on_load(two_runs, tmp_path):
    folder = mixed_folder(two_runs, tmp_path)
    with pytest.raises(inference.InferenceError) as err:
        inference.load_segmenter(folder / "model.onnx")
    message = str(err.value)
    assert "\n" not in message and "not one export" in message
    assert str(folder / "model.onnx") in message and str(folder / "labels.json") in message
    # both exports as written load
    for name in ("a", "b"):
        inference.load_segmenter(two_runs["exports"][name])


@pytest.mark.parametrize("tool", ["evaluate", "predict"])
def test_evaluate_and_predict_refuse_a_mixed_pair_in_one_line(two_runs, tmp_path, capsys, tool):
    folder = mixed_folder(two_runs, tmp_path)
    model = str(folder / "model.onnx")
    if tool == "evaluate":
        argv = ["--model", model, "--data", two_runs["data"], "--output", str(tmp_path / "out"), "--no-progress"]
    else:
        argv = ["--model", model, "--input", str(two_runs["photos"]), "--output", str(tmp_path / "out"),
                "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        (evaluate if tool == "evaluate" else predict).main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and model in err and str(folder / "labels.json") in err
    assert not os.path.exists(tmp_path / "out" / "metrics.json")


def test_labels_without_checksums_are_refused(two_runs, tmp_path):
    """An export whose labels.json binds no file (as written before the checksums) cannot be trusted."""
    folder = tmp_path / "old"
    shutil.copytree(two_runs["root"] / "onnx-a", folder)
    labels = json.loads((folder / "labels.json").read_text())
    del labels["artifact"]["files"]
    (folder / "labels.json").write_text(json.dumps(labels))
    with pytest.raises(inference.InferenceError, match="no checksum"):
        inference.load_segmenter(folder / "model.onnx")


@pytest.mark.slow  # two OpenVINO exports: 9 s on CPU-E
def test_an_openvino_export_killed_between_its_two_files_leaves_nothing_that_loads(two_runs, tmp_path, monkeypatch):
    folder = tmp_path / "openvino"
    export.export_artifact(two_runs["runs"]["a"], folder, "openvino", log=quiet)
    inference.load_segmenter(folder / "model.xml")  # a whole export loads
    real_replace, moved = os.replace, []

    def killed_after_the_first_file(source, target):
        if os.path.dirname(os.fspath(target)) == str(folder):
            if moved:
                raise KeyboardInterrupt  # the kill, after one of the two files moved in
            moved.append(os.path.basename(os.fspath(target)))
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", killed_after_the_first_file)
    with pytest.raises(KeyboardInterrupt):
        export.export_artifact(two_runs["runs"]["b"], folder, "openvino", overwrite=True, log=quiet)
    monkeypatch.undo()
    assert moved and moved[0] in ("model.bin", "model.xml")
    assert sorted(os.listdir(folder)) == ["labels.json", "model.bin", "model.xml"]  # one new file, one old
    with pytest.raises(inference.InferenceError, match="not one export"):
        inference.load_segmenter(folder / "model.xml")
