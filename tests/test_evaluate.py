"""Evaluation against a numpy confusion matrix; sliding windows and flips against a per-pixel model."""

import json
import os
import shutil

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seg import data, demo, evaluate, export, inference, tfrecord
from keras_seg.labels import cityscapes_label_space
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


def numpy_confusion(masks, predictions, num_classes=19):
    """Reference confusion matrix, counted pixel by pixel with np.add.at (255 not counted)."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    for mask, prediction in zip(masks, predictions):
        valid = mask != 255
        np.add.at(cm, (mask[valid].astype(np.int64), prediction[valid].astype(np.int64)), 1)
    return cm


def run_evaluate(capsys, *args):
    assert evaluate.main(["--no-progress", *args]) == 0
    return capsys.readouterr().out


def test_input_size_evaluation_matches_a_numpy_confusion_matrix(setup, tmp_path, capsys):
    out = run_evaluate(capsys, "--model", setup["run"], "--data", setup["data"], "--output", str(tmp_path))
    report = json.loads((tmp_path / "metrics.json").read_text())

    # Reference: the Keras checkpoint on the reader's resized images and nearest-resized masks.
    model = keras.saving.load_model(os.path.join(setup["run"], "best.keras"), compile=False)
    masks, predictions = [], []
    for image, mask in val_examples(setup["data"]):
        image, mask = (t.numpy() for t in data.resize_example(tf.constant(image), tf.constant(mask), INPUT_SIZE))
        predictions.append(np.argmax(model(image[None].astype(np.float32) / 255.0, training=False)[0], -1))
        masks.append(mask)
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
    assert report["images"] == 4 and report["mode"] == "input-size"
    assert "mIoU" in out and "category mIoU" in out
    picture = cv2.imread(str(tmp_path / "confusion_matrix.png"))
    assert picture is not None and picture.shape[1] > 19 * 28
    assert "road" in (tmp_path / "per_class_iou.txt").read_text()


def test_full_resolution_sliding_window_counts_every_original_pixel(setup, tmp_path, capsys):
    run_evaluate(capsys, "--model", setup["run"], "--data", setup["data"], "--output", str(tmp_path), "--full-res",
                 "--tile", "64x128", "--overlap", "0.5", "--flip")
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["mode"] == "fullres-slide-flip" and report["tile"] == [64, 128] and report["overlap"] == 0.5
    segmenter = inference.load_segmenter(setup["run"])
    examples = val_examples(setup["data"])
    predictions = [inference.predict_image(segmenter, image, "slide", flip=True, tile=(64, 128), overlap=0.5).class_ids
                   for image, _ in examples]
    assert predictions[0].shape == DATA_SIZE
    expected = numpy_confusion([mask for _, mask in examples], predictions)
    np.testing.assert_array_equal(np.array(report["confusion_matrix"]), expected)


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
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(["--no-progress", "--output", str(tmp_path / "out"), *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, args
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err


# --------------------------------------------------------------------------- sliding windows and flips


def pointwise_segmenter(num_classes=5):
    """A model whose every pixel's output depends on that pixel alone: any tiling must give the whole-image answer."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3))
    hidden = keras.layers.Conv2D(8, 1, activation="tanh")(inputs)
    model = keras.Model(inputs, keras.layers.Conv2D(num_classes, 1)(hidden))
    info = {"input_size": [32, 64], "num_classes": num_classes, "class_names": [f"c{i}" for i in range(num_classes)],
            "colors": [[i * 40, 0, 0] for i in range(num_classes)], "ignore_index": 255, "label_space": "test"}
    return model, inference.segmenter_from_model(model, info)


@pytest.mark.parametrize("size, overlap, flip", [((70, 150), 1 / 3, False), ((45, 200), 0.5, True),
                                                 ((20, 30), 0.25, False)])
def test_sliding_window_equals_the_whole_image_for_a_per_pixel_model(size, overlap, flip):
    model, segmenter = pointwise_segmenter()
    image = np.random.default_rng(1).integers(0, 256, (*size, 3), dtype=np.uint8)
    expected = tf.nn.softmax(model(image[None].astype(np.float32) / 255.0)).numpy()[0]
    got = inference.sliding_window_probabilities(segmenter, image, overlap=overlap, flip=flip, batch_size=3)
    assert got.shape == (*size, 5)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    prediction = inference.predict_image(segmenter, image, "slide", flip=flip, overlap=overlap)
    assert prediction.class_ids.shape == size and prediction.class_ids.dtype == np.uint8
    np.testing.assert_allclose(prediction.confidence, expected.max(-1), atol=1e-5)


def test_flip_averaging_is_the_mean_of_the_image_and_its_mirror():
    model, segmenter = pointwise_segmenter()
    images = np.random.default_rng(2).integers(0, 256, (2, 32, 64, 3), dtype=np.uint8)
    plain = tf.nn.softmax(model(images.astype(np.float32) / 255.0)).numpy()
    got = inference.predict_probabilities_resized(segmenter, images, flip=True).numpy()
    # Per pixel, the mirror image's answer flipped back is the image's own: a missing flip back, or one
    # along the wrong axis, would not match.
    np.testing.assert_allclose(got, plain, atol=1e-5)


@pytest.mark.parametrize("length, tile, stride, expected", [
    (300, 128, 86, [0, 86, 172]), (128, 128, 64, [0]), (100, 128, 64, [0]), (257, 128, 128, [0, 128, 129]),
])
def test_window_offsets_cover_the_length_and_end_at_the_edge(length, tile, stride, expected):
    offsets = inference.window_offsets(length, tile, stride)
    assert offsets == expected
    assert offsets[-1] + tile >= length and all(b - a <= stride for a, b in zip(offsets, offsets[1:]))


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
