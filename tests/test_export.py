"""Export: the SavedModel layout, a TF Serving REST request in a process without keras_seg, float32 graphs."""

import base64
import json
import os
import subprocess
import sys

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from keras_seg import data, demo, export, inference
from keras_seg.inference import load_run_model
from keras_seg.labels import cityscapes_label_space
from tiny_run import INPUT_SIZE, write_run


def keras_resize_prediction(model, image):
    """The Keras model's prediction in resize mode: the training reader's resize, softmax resized back, arg-max."""
    small, _ = data.resize_example(tf.constant(image), tf.zeros(image.shape[:2], tf.uint8), INPUT_SIZE)
    probabilities = tf.nn.softmax(model(tf.cast(small, tf.float32)[None] / 255.0, training=False))
    return np.argmax(tf.image.resize(probabilities, image.shape[:2], method="bilinear").numpy()[0], axis=-1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run = write_run(root / "tiny_run")
    assert export.main(["--run", run, "--output", str(root / "models"), "--name", "tiny"]) == 0
    return run, root / "models" / "tiny"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two street scenes at 96x200 (not the model's size), as RGB arrays and as JPEG / PNG bytes."""
    rng = np.random.default_rng(5)
    images = [demo.draw_scene(rng, (96, 200))[0] for _ in range(2)]
    jpeg = cv2.imencode(".jpg", images[0][:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    png = cv2.imencode(".png", images[1][:, :, ::-1])[1].tobytes()
    decoded_jpeg = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    return {"jpeg": jpeg, "png": png, "pixels": [np.ascontiguousarray(decoded_jpeg), images[1]]}


def test_layout_and_labels_asset(exported):
    _, model_dir = exported
    version = model_dir / "1"
    assert sorted(os.listdir(model_dir)) == ["1"]  # no temporary folder left for TF Serving to trip on
    assert (version / "saved_model.pb").is_file() and (version / "variables").is_dir()
    labels = json.loads((version / "assets" / "labels.json").read_text())
    space = cityscapes_label_space("trainid")
    assert labels["class_names"] == list(space.class_names)
    assert labels["colors"] == [list(c) for c in space.class_colors]
    assert labels["ignore_index"] == 255 and labels["label_space"] == "trainid"
    assert labels["input_size"] == [64, 128] and labels["preset"] == "unet_small" and labels["num_classes"] == 19
    # trained by stretching: it keeps stretching, at any multiple of the tiny UNet's stride (2**3)
    stretch = {"resize": "stretch", "scale": [64, 128], "mode": "whole", "input_size": [64, 128], "overlap": 1 / 3}
    assert labels["inference"] == {**stretch, "size_divisor": 8}
    # a run recorded before contracts existed stretches too, padded to its input as it was
    assert inference.run_contract({"image_size": [64, 128]}).to_dict() == stretch


# Runs in a fresh interpreter where importing keras_seg fails: the export must stand on TF alone.
CLIENT = r"""
import base64, json, sys
import numpy as np

class NoKerasSeg:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "keras_seg":
            raise ImportError("keras_seg is blocked in this process")

sys.meta_path.insert(0, NoKerasSeg())
import tensorflow as tf

model_dir, request_path, out_path = sys.argv[1:4]
loaded = tf.saved_model.load(model_dir)
# TF Serving's REST row format: {"instances": [{"b64": ...}, ...]} for a signature with one string input.
request = json.load(open(request_path))
images = tf.constant([base64.b64decode(instance["b64"]) for instance in request["instances"]])
served = loaded.signatures["serving_default"](images=images)
pixels = tf.io.decode_png(images[1], channels=3)[None]
uint8 = loaded.signatures["segment_uint8"](images=pixels)
probabilities = loaded.signatures["probabilities"](images=pixels)["probabilities"]
np.savez(out_path, class_ids=served["class_ids"].numpy(), confidence=served["confidence"].numpy(),
         uint8_class_ids=uint8["class_ids"].numpy(), probabilities=probabilities.numpy())
signature = loaded.signatures["serving_default"]
print(json.dumps({
    "keras_seg_imported": any(m.split(".")[0] == "keras_seg" for m in sys.modules),
    "signatures": sorted(loaded.signatures),
    "inputs": {k: [v.dtype.name, v.shape.as_list()] for k, v in signature.structured_input_signature[1].items()},
    "outputs": {k: [v.dtype.name, v.shape.as_list()] for k, v in signature.structured_outputs.items()},
}))
"""


@pytest.mark.slow  # 5 s on CPU-E (a subprocess); test_predict's serving test stays
def test_tf_serving_request_in_a_process_without_keras_seg(exported, photos, tmp_path):
    run, model_dir = exported
    request = {"instances": [{"b64": base64.b64encode(photos[kind]).decode("ascii")} for kind in ("jpeg", "png")]}
    (tmp_path / "request.json").write_text(json.dumps(request))
    (tmp_path / "client.py").write_text(CLIENT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    done = subprocess.run(
        [sys.executable, str(tmp_path / "client.py"), str(model_dir / "1"), str(tmp_path / "request.json"),
         str(tmp_path / "out.npz")],
        capture_output=True, text=True, timeout=120, cwd=str(tmp_path), env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["keras_seg_imported"] is False
    assert report["signatures"] == ["model_probabilities", "probabilities", "segment_uint8", "serving_default"]
    assert report["inputs"] == {"images": ["string", [None]]}
    assert report["outputs"] == {"class_ids": ["int32", [None, None, None]],
                                 "confidence": ["float32", [None, None, None]]}

    out = np.load(tmp_path / "out.npz")
    assert out["class_ids"].shape == (2, 96, 200) and out["class_ids"].dtype == np.int32
    model = keras.saving.load_model(os.path.join(run, "best.keras"), compile=False)
    for served, image in zip(out["class_ids"], photos["pixels"]):
        agreement = np.mean(served == keras_resize_prediction(model, image))
        assert agreement >= 0.999, agreement
    # confidence is the top softmax probability: in (1/C, 1]
    assert out["confidence"].dtype == np.float32
    assert np.all(out["confidence"] >= 1 / 19 - 1e-6) and np.all(out["confidence"] <= 1 + 1e-6)
    # the uint8 signature gives the same answer on the same (lossless) pixels
    np.testing.assert_array_equal(out["uint8_class_ids"][0], out["class_ids"][1])
    # probabilities at the image's size, each pixel a distribution
    assert out["probabilities"].shape == (1, 96, 200, 19)
    np.testing.assert_allclose(out["probabilities"].sum(-1), 1.0, atol=1e-5)


def _graph_dtypes(saved_model_dir):
    """Every dtype named by any node of the SavedModel's graph and function library."""
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((saved_model_dir / "saved_model.pb").read_bytes())
    graph = proto.meta_graphs[0].graph_def
    names = set()
    for node in list(graph.node) + [n for f in graph.library.function for n in f.node_def]:
        for value in node.attr.values():
            types = ([value.type] if value.type else []) + list(value.list.type)
            names.update(tf.dtypes.as_dtype(t).name for t in types)
    return names


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_run_exports_a_float32_graph(tmp_path, precision):
    run = write_run(tmp_path / "mixed", precision=precision)
    path = export.export_saved_model(run, tmp_path / "models", log=lambda _: None)
    dtypes = _graph_dtypes(tmp_path / "models" / "mixed" / "1")
    assert "float32" in dtypes and not dtypes & {"bfloat16", "float16", "half"}, dtypes
    assert json.loads((tmp_path / "models" / "mixed" / "1" / "assets" / "labels.json").read_text())[
        "trained_precision"] == precision
    # the same weights: the export computes what a float32 rebuild of the checkpoint computes
    float32_model, _ = load_run_model(run)
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 128, 3), dtype=np.uint8)
    served = tf.saved_model.load(path).signatures["probabilities"](images=tf.constant(images))["probabilities"]
    assert served.shape == (2, 64, 128, 19)  # images at the contract's scale: neither resized nor windowed
    expected = tf.nn.softmax(float32_model(images.astype(np.float32) / 255.0))
    np.testing.assert_allclose(served.numpy(), expected.numpy(), atol=1e-5)


def test_versions_are_never_overwritten_by_surprise(exported, capsys):
    run, model_dir = exported
    output = str(model_dir.parent)
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--run", run, "--output", output, "--name", "tiny", "--version", "1"])
    assert exit_info.value.code == 2
    assert "exists" in capsys.readouterr().err
    before = (model_dir / "1" / "saved_model.pb").stat().st_mtime_ns
    assert export.main(["--run", run, "--output", output, "--name", "tiny", "--version", "1", "--overwrite"]) == 0
    assert sorted(os.listdir(model_dir)) == ["1"]
    assert (model_dir / "1" / "saved_model.pb").stat().st_mtime_ns != before


def test_next_version_is_one_above_the_highest_number(tmp_path):
    assert export.next_version(str(tmp_path / "absent")) == 1
    for name in ("1", "3", ".4.partial-x", "notes"):
        (tmp_path / name).mkdir()
    assert export.next_version(str(tmp_path)) == 4


@pytest.mark.parametrize("make, message", [
    (lambda d: str(d / "missing"), "no such directory"),
    (lambda d: (d / "empty").mkdir() or str(d / "empty"), "not a run directory"),
])
def test_bad_runs_give_one_line_errors(tmp_path, capsys, make, message):
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--run", make(tmp_path), "--output", str(tmp_path / "models")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize("folder, expected", [("ce+dice", "ce_dice"), ("a=b", "a_b"), ("my run", "my_run"),
                                              ("städte", "stadte"), ("+x", "x"), ("日本", "model")])
def test_any_run_folder_gives_a_valid_model_name(tmp_path, folder, expected):
    assert export.model_name_from_folder(tmp_path / folder) == expected


def test_a_run_in_a_folder_named_as_users_name_them_exports(tmp_path):
    """issue 31 item 1: the trainer exports without --name; a run folder with '+' (ce+dice) was refused
    after the whole run. The default name is made valid; a --name given is still checked as it is."""
    run = write_run(tmp_path / "ce+dice")
    path = export.export_saved_model(run, tmp_path / "models", log=lambda _: None)
    assert path == str(tmp_path / "models" / "ce_dice" / "1")
    assert (tmp_path / "models" / "ce_dice" / "1" / "saved_model.pb").is_file()
    with pytest.raises(export.ExportError, match=r"--name 'a\+b'"):
        export.export_saved_model(run, tmp_path / "models", name="a+b", log=lambda _: None)


def test_the_deployment_model_computes_in_float32_under_a_mixed_policy():
    """A run trained in mixed precision in this process leaves the global policy set; the wrapper the
    artifacts are converted from must not take it (a bfloat16 Mul stopped the LiteRT conversion)."""
    import keras

    from keras_seg.export import deployment_model
    from keras_seg.models.presets import build_model

    model = build_model({"model": {"architecture": "unet", "depth": 2, "base_filters": 4}, "input_size": (32, 32)}, 3)
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        wrapped = deployment_model(model, (32, 32))
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"  # the caller's, as it was
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert {layer.compute_dtype for layer in wrapped.layers if layer is not model} == {"float32"}
