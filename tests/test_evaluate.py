"""Evaluation against a numpy confusion matrix; sliding windows and flips against a per-pixel model."""

import json
import os
import shutil

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seg import contract as contracts
from keras_seg import demo, evaluate, export, tfrecord
from keras_seg.labels import cityscapes_label_space
from keras_seg.inference import load_run_model
from contract_reference import keras_probabilities, numpy_confusion, reference_probabilities
from tiny_run import INPUT_SIZE, write_run

DATA_SIZE = (96, 192)  # stored size, larger than the model's input: resized, or tiled at full resolution


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    data_dir = demo.write_demo_dataset(str(root / "data"), splits={"val": 4}, size=DATA_SIZE, log=lambda _: None)
    return {"root": root, "data": data_dir, "run": write_run(root / "run")}


def val_examples(data_dir):
    """(image uint8 [H, W, 3], mask uint8 [H, W]) of the val split, in stored order."""
    info = tfrecord.load_dataset_info(data_dir)
    examples = []
    for shard in info["splits"]["val"]["shards"]:
        for record in tfrecord.read_records(os.path.join(data_dir, shard)):
            image, mask, _ = tfrecord.decode_arrays(record)
            examples.append((image, mask))
    return examples


def run_evaluate(capsys, *args):
    assert evaluate.main(["--no-progress", *args]) == 0
    return capsys.readouterr().out


def test_default_evaluation_follows_the_contract_at_original_resolution(setup, tmp_path, capsys):
    out = run_evaluate(capsys, "--model", setup["run"], "--data", setup["data"], "--output", str(tmp_path))
    report = json.loads((tmp_path / "metrics.json").read_text())

    # Reference: the Keras checkpoint on images stretched to the input size (the run's contract),
    # its softmax resized back to the stored 96x192, scored against the original masks.
    model_fn = keras_probabilities(keras.saving.load_model(os.path.join(setup["run"], "best.keras"), compile=False))
    examples = val_examples(setup["data"])
    predictions = [reference_probabilities(image, model_fn, "stretch", INPUT_SIZE, INPUT_SIZE).argmax(-1)
                   for image, _ in examples]
    masks = [mask for _, mask in examples]
    assert predictions[0].shape == DATA_SIZE
    expected = numpy_confusion(masks, predictions)
    got = np.array(report["confusion_matrix"])
    assert got.sum() == expected.sum() == sum(int(np.sum(m != 255)) for m in masks)
    assert np.abs(got - expected).sum() <= 0.002 * expected.sum()  # float32 graph vs eager: rare ties

    # The metrics are those of the written matrix.
    tp = np.diag(got).astype(float)
    union = got.sum(0) + got.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    assert report["miou"] == pytest.approx(np.nanmean(iou))
    assert report["pixel_accuracy"] == pytest.approx(tp.sum() / got.sum())
    dice = np.where(got.sum(0) + got.sum(1) > 0, 2 * tp / np.maximum(got.sum(0) + got.sum(1), 1), np.nan)
    assert report["mean_dice"] == pytest.approx(np.nanmean(dice))
    written = [report["per_class"][name]["iou"] for name in cityscapes_label_space("trainid").class_names]
    assert [None if np.isnan(v) else pytest.approx(v) for v in iou] == written  # absent classes: null
    assert "category_miou" in report and set(report["per_category_iou"]) >= {"flat", "vehicle"}
    assert report["images"] == 4 and report["mode"] == "contract"
    assert report["inference"]["resize"] == "stretch"
    assert "mIoU" in out and "category mIoU" in out
    picture = cv2.imread(str(tmp_path / "confusion_matrix.png"))
    assert picture is not None and picture.shape[1] > 19 * 28
    assert "road" in (tmp_path / "per_class_iou.txt").read_text()


def test_sliding_windows_at_original_resolution_count_every_pixel(setup, tmp_path, capsys):
    # A run trained on crops infers its images at their own resolution with windows of the crop size.
    crop_run = tmp_path / "crop_run"
    shutil.copytree(setup["run"], crop_run)
    config = json.loads((crop_run / "config.json").read_text())
    crop_contract = contracts.for_training("crop", INPUT_SIZE).to_dict()  # as training records it
    (crop_run / "config.json").write_text(json.dumps({**config, "resize_mode": "crop", "inference": crop_contract}))
    run_evaluate(capsys, "--model", str(crop_run), "--data", setup["data"], "--output", str(tmp_path / "out"),
                 "--overlap", "0.5", "--flip")
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["mode"] == "overlap0.5-flip"
    assert report["inference"] == {"resize": "none", "scale": None, "mode": "slide", "input_size": [64, 128],
                                   "overlap": 0.5}
    model_fn = keras_probabilities(keras.saving.load_model(str(crop_run / "best.keras"), compile=False))
    examples = val_examples(setup["data"])
    predictions = [reference_probabilities(image, model_fn, "none", None, INPUT_SIZE, 0.5, flip=True).argmax(-1)
                   for image, _ in examples]
    expected = numpy_confusion([mask for _, mask in examples], predictions)
    got = np.array(report["confusion_matrix"])
    assert got.sum() == expected.sum()
    assert np.abs(got - expected).sum() <= 0.002 * expected.sum()


@pytest.mark.slow  # 6 s on CPU-E (3 scales x flip); tests/test_tta_scales.py's TTA tests stay
def test_tta_averages_every_scale_and_flip(setup, tmp_path, capsys):
    scales = (0.5, 1.0, 1.75)
    run_evaluate(capsys, "--model", setup["run"], "--data", setup["data"], "--output", str(tmp_path), "--tta",
                 "--scales", ",".join(map(str, scales)), "--batch-size", "3")
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["flip"] is True and report["scales"] == list(scales) and report["mode"] == "tta"
    # Each ratio at its own size, padded to a multiple of the tiny UNet's stride 2**3 (the run's contract);
    # through the (None, None)-input copy of the run's model that such a contract runs.
    model_fn = keras_probabilities(load_run_model(setup["run"])[0])
    examples = val_examples(setup["data"])
    masks = [mask for _, mask in examples]
    predictions = [reference_probabilities(image, model_fn, "stretch", INPUT_SIZE, INPUT_SIZE, flip=True,
                                           scales=scales, size_divisor=8).argmax(-1) for image, _ in examples]
    expected = numpy_confusion(masks, predictions)
    got = np.array(report["confusion_matrix"])
    assert np.abs(got - expected).sum() <= 0.002 * expected.sum()


def test_bad_inputs_give_one_line_errors(setup, tmp_path, capsys):
    voc = tmp_path / "voc"
    shutil.copytree(setup["data"], voc)
    info = tfrecord.load_dataset_info(str(voc))
    info.update(num_classes=21, label_space="voc", class_names=[f"c{i}" for i in range(21)])
    tfrecord.write_dataset_info(str(voc), info)
    cases = [
        (["--model", str(tmp_path / "nothing"), "--data", setup["data"]], "no such file or directory"),
        (["--model", setup["run"], "--data", str(tmp_path / "nothing")], "no such directory"),
        (["--model", setup["run"], "--data", setup["data"], "--split", "test"], "no split 'test'"),
        (["--model", setup["run"], "--data", str(voc)], "not the same label space"),
        (["--model", setup["run"], "--data", setup["data"], "--overlap", "1"], "--overlap"),
        (["--model", setup["run"], "--data", setup["data"], "--full-res"], "original resolution"),
        (["--model", setup["run"], "--data", setup["data"], "--inference", "slide"], "--tile"),
        (["--model", setup["run"], "--data", setup["data"], "--scales", "0.5,1"], "--tta"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(["--no-progress", "--output", str(tmp_path / "out"), *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, args
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_an_exported_model_without_output_is_refused_before_it_loads(setup, tmp_path, capsys):
    # Files that no runtime could load: the refusal must come first, naming --output and the file.
    for name in ("model.tflite", "model.onnx", "model.xml"):
        path = tmp_path / name
        path.write_bytes(b"not a model")
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(["--no-progress", "--model", str(path), "--data", setup["data"]])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: --output DIR is needed"), err
        assert str(path) in err and not any(p.name != name for p in tmp_path.iterdir()), err
        path.unlink()


def test_a_saved_model_evaluates_like_its_run(setup, tmp_path, capsys):
    saved = export.export_saved_model(setup["run"], setup["root"] / "models", log=lambda _: None)
    run_evaluate(capsys, "--model", setup["run"], "--data", setup["data"], "--output", str(tmp_path / "run"))
    run_evaluate(capsys, "--model", os.path.dirname(saved), "--data", setup["data"], "--output",
                 str(tmp_path / "saved"))
    from_run = np.array(json.loads((tmp_path / "run" / "metrics.json").read_text())["confusion_matrix"])
    from_saved = np.array(json.loads((tmp_path / "saved" / "metrics.json").read_text())["confusion_matrix"])
    assert np.abs(from_run - from_saved).sum() <= 0.002 * from_run.sum()
    # nothing is written into an export unless asked where
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--no-progress", "--model", saved, "--data", setup["data"]])
    assert exit_info.value.code == 2 and "--output" in capsys.readouterr().err


def test_results_are_not_overwritten_without_overwrite(setup, tmp_path, capsys):
    args = ["--model", setup["run"], "--data", setup["data"], "--output", str(tmp_path), "--limit", "1"]
    run_evaluate(capsys, *args)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--no-progress", *args])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    run_evaluate(capsys, *args, "--overwrite")
    assert json.loads((tmp_path / "metrics.json").read_text())["images"] == 1


# --------------------------------------------------------------------------- the contract's graph


def pointwise_model(num_classes=5):
    """A model whose every pixel's output depends on that pixel alone: any tiling must give the whole-image answer."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3))
    hidden = keras.layers.Conv2D(8, 1, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Conv2D(num_classes, 1)(hidden))


@pytest.mark.parametrize("size, overlap, flip", [((70, 150), 1 / 3, False), ((45, 200), 0.5, True),
                                                 ((20, 30), 0.25, False)])
def test_sliding_window_equals_the_whole_image_for_a_per_pixel_model(size, overlap, flip):
    model = pointwise_model()
    image = np.random.default_rng(1).integers(0, 256, (*size, 3), dtype=np.uint8)
    expected = tf.nn.softmax(model(image[None].astype(np.float32) / 255.0)).numpy()[0]
    contract = contracts.InferenceContract("none", None, "slide", (32, 64), overlap)
    got = contracts.contract_probabilities(image[None], contracts.keras_model_fn(model), contract, 5, flip=flip)
    assert got.shape == (1, *size, 5)
    np.testing.assert_allclose(got[0], expected, atol=1e-5)


def column_dependent_fn(window_width):
    """Softmax of logits that depend on the pixel, on its column in the window and on the window's content:
    neither flip- nor scale-equivariant, so any skipped flip or scale changes the average."""
    weights = tf.constant(np.random.default_rng(4).normal(size=(3, 4)), tf.float32)
    ramp = tf.constant(np.linspace(-2, 2, window_width), tf.float32)

    def model_fn(x):
        x = tf.cast(x, tf.float32)
        logits = tf.einsum("nhwk,kc->nhwc", x, weights) * 3.0
        logits += ramp[None, None, :, None] * tf.constant([1.0, -1.0, 0.5, 0.0])
        logits += tf.reduce_mean(x, axis=[1, 2, 3])[:, None, None, None] * tf.constant([0.0, 2.0, -2.0, 1.0])
        return tf.nn.softmax(logits)

    return model_fn


@pytest.mark.parametrize("resize, scale", [("stretch", (16, 32)), ("keep_ratio", (16, 40)), ("none", None)])
def test_flip_and_multi_scale_averaging_against_a_reference(resize, scale):
    window, scales = (16, 32), (0.5, 1.0, 1.5)
    model_fn = column_dependent_fn(window[1])
    image = np.random.default_rng(3).integers(0, 256, (20, 36, 3), dtype=np.uint8)
    contract = contracts.InferenceContract(resize, scale, "slide", window)
    got = contracts.contract_probabilities(image[None], model_fn, contract, 4, flip=True, scales=scales).numpy()[0]
    numpy_fn = lambda x: model_fn(x).numpy()  # noqa: E731
    expected = reference_probabilities(image, numpy_fn, resize, scale, window, flip=True, scales=scales)
    np.testing.assert_allclose(got, expected, atol=2e-5)
    # The reference tells the variants apart: without the flip, or without any one scale, it is another answer.
    for variant in [dict(flip=False, scales=scales)] + [dict(flip=True, scales=tuple(s for s in scales if s != left))
                                                        for left in scales]:
        other = reference_probabilities(image, numpy_fn, resize, scale, window, **variant)
        assert np.abs(other - expected).max() > 1e-3, variant


@pytest.mark.parametrize("length, tile, stride, expected", [
    (300, 128, 86, [0, 86, 172]), (128, 128, 64, [0]), (257, 128, 128, [0, 128, 129]), (214, 128, 43, [0, 43, 86]),
])
def test_window_offsets_cover_the_length_and_end_at_the_edge(length, tile, stride, expected):
    offsets = contracts.window_offsets(tf.constant(length), tile, stride).numpy().tolist()
    assert offsets == expected
    assert offsets[-1] + tile == length and all(b - a <= stride for a, b in zip(offsets, offsets[1:]))


def test_confusion_matrix_picture_shades_rows_by_share():
    from keras_seg.visualize import confusion_matrix_image

    cm = np.array([[90, 10, 0], [0, 0, 0], [0, 50, 50]])
    picture = confusion_matrix_image(cm, ["a", "b", "c"], cell=30)
    colors = {tuple(c) for c in picture.reshape(-1, 3)}
    assert (8, 48, 107) not in colors  # no cell is at 100 %
    dark = tuple(int(v) for v in np.round(255 * 0.1 + np.array([8, 48, 107]) * 0.9))
    assert dark in colors and (225, 225, 225) in colors  # 90 % shade; the empty row 'b' is grey
    with pytest.raises(ValueError):
        confusion_matrix_image(cm, ["a", "b"])
