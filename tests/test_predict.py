"""predict: files at the right sizes in the right colours, Cityscapes labelIds, clear errors, full-res photos."""

import os

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seg import data, demo, predict
from keras_seg.labels import CITYSCAPES_LABELS, cityscapes_label_space
from tiny_run import INPUT_SIZE, write_run

PHOTO_SIZE = (96, 192)
SPACE = cityscapes_label_space("trainid")


def read_rgb(path):
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    return image[:, :, ::-1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A run, two scenes named like Cityscapes photos (PNG in a city folder, JPEG beside it), and their masks."""
    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(7)
    photos, gt = root / "photos", root / "gt"
    (photos / "frankfurt").mkdir(parents=True)
    gt.mkdir()
    scenes = {}
    for name, suffix in (("frankfurt/frankfurt_000000_000001_leftImg8bit", ".png"),
                         ("lindau_000000_000002_leftImg8bit", ".jpg")):
        image, mask = demo.draw_scene(rng, PHOTO_SIZE)
        cv2.imwrite(str(photos / f"{name}{suffix}"), image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        cv2.imwrite(str(gt / f"{os.path.basename(name)}.png"), mask)
        scenes[name] = (read_rgb(photos / f"{name}{suffix}"), mask)
    return {"root": root, "run": write_run(root / "run"), "photos": photos, "gt": gt, "scenes": scenes}


def keras_resize_prediction(model, image):
    """The Keras model's prediction in resize mode: the training reader's resize, softmax resized back, arg-max."""
    small, _ = data.resize_example(tf.constant(image), tf.zeros(image.shape[:2], tf.uint8), INPUT_SIZE)
    probabilities = tf.nn.softmax(model(tf.cast(small, tf.float32)[None] / 255.0, training=False))
    return np.argmax(tf.image.resize(probabilities, image.shape[:2], method="bilinear").numpy()[0], axis=-1)


def run_predict(*args):
    assert predict.main(["--no-progress", *args]) == 0


def test_masks_overlays_and_panels(setup, tmp_path):
    run_predict("--model", setup["run"], "--input", str(setup["photos"]), "--output", str(tmp_path),
                "--gt", str(setup["gt"]))
    model = keras.saving.load_model(os.path.join(setup["run"], "best.keras"), compile=False)
    palette = np.array(SPACE.class_colors, np.uint8)
    height, width = PHOTO_SIZE
    for name, (image, gt) in setup["scenes"].items():
        mask = read_rgb(tmp_path / f"{name}_mask.png")
        assert mask.shape == (height, width, 3)
        # every pixel is a class colour, and the colours are those of the Keras model's prediction
        expected = palette[keras_resize_prediction(model, image)]
        assert np.mean(np.all(mask == expected, axis=-1)) >= 0.999
        overlay = read_rgb(tmp_path / f"{name}_overlay.png")
        assert overlay.shape == (height, width, 3)
        blend = (image.astype(np.float32) * 0.5 + mask.astype(np.float32) * 0.5).astype(np.uint8)
        assert np.abs(overlay.astype(int) - blend.astype(int)).max() <= 1
        panel = read_rgb(tmp_path / f"{name}_panel.png")
        assert panel.shape == (height, 3 * width + 2 * 4, 3)  # image | prediction | ground truth, 4-pixel gaps
        np.testing.assert_array_equal(panel[:, width + 4:2 * width + 4], mask)
        gt_colors = np.zeros((256, 3), np.uint8)
        gt_colors[:19] = palette
        np.testing.assert_array_equal(panel[:, 2 * width + 8:], gt_colors[gt])
    assert len(os.listdir(tmp_path / "frankfurt")) == 3  # sub-folders of the input are kept


def test_panels_are_scaled_to_the_panel_height(setup, tmp_path):
    photo = str(setup["photos"] / "lindau_000000_000002_leftImg8bit.jpg")
    run_predict("--model", setup["run"], "--input", photo, "--output", str(tmp_path), "--panel-height", "48")
    panel = read_rgb(tmp_path / "lindau_000000_000002_leftImg8bit_panel.png")
    assert panel.shape == (48, 2 * 96 + 4, 3)
    assert read_rgb(tmp_path / "lindau_000000_000002_leftImg8bit_mask.png").shape == (*PHOTO_SIZE, 3)


def test_cityscapes_labelids_for_the_official_script(setup, tmp_path):
    run_predict("--model", setup["run"], "--input", str(setup["photos"]), "--output", str(tmp_path),
                "--format", "cityscapes-labelids", "--flip")
    written = sorted(os.path.relpath(os.path.join(r, f), tmp_path) for r, _, fs in os.walk(tmp_path) for f in fs)
    assert written == ["frankfurt/frankfurt_000000_000001_pred_labelIds.png", "lindau_000000_000002_pred_labelIds.png"]
    label_ids = cv2.imread(str(tmp_path / written[1]), cv2.IMREAD_UNCHANGED)
    assert label_ids.shape == PHOTO_SIZE and label_ids.dtype == np.uint8
    evaluated = {lab.id for lab in CITYSCAPES_LABELS if 0 <= lab.train_id < 255}
    assert set(np.unique(label_ids)) <= evaluated
    # the ids map back to trainIds through the official table, i.e. the converter's label space
    train_ids = SPACE.map_raw(label_ids)
    assert np.all(train_ids < 19)


def test_outputs_are_not_overwritten_without_overwrite(setup, tmp_path, capsys):
    photo = str(setup["photos"] / "lindau_000000_000002_leftImg8bit.jpg")
    args = ["--model", setup["run"], "--input", photo, "--output", str(tmp_path)]
    run_predict(*args)
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--no-progress", *args])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    run_predict(*args, "--overwrite")


def test_bad_inputs_give_one_line_errors(setup, tmp_path, capsys):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    foreign = tmp_path / "foreign_saved_model"

    class Doubler(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
        def double(self, x):
            return {"y": 2 * x}

    module = Doubler()
    tf.saved_model.save(module, str(foreign), signatures={"serving_default": module.double})
    photo = str(setup["photos"] / "lindau_000000_000002_leftImg8bit.jpg")
    cases = [
        (["--model", setup["run"], "--input", str(not_an_image)], "not an image"),
        (["--model", str(tmp_path / "missing_run"), "--input", photo], "no such file or directory"),
        (["--model", str(foreign), "--input", photo], "not exported by keras_seg.export"),
        (["--model", setup["run"], "--input", str(tmp_path / "missing.png")], "no such file or directory"),
        (["--model", setup["run"], "--input", photo, "--gt", str(tmp_path)], "no ground truth"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            predict.main(["--no-progress", "--output", str(tmp_path / "out"), *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, args
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_full_resolution_cityscapes_photos(setup, shared_data, tmp_path):
    photos = sorted((shared_data / "cityscapes_fullres_nogt").rglob("*_leftImg8bit.png"))
    assert photos, "no photos in cityscapes_fullres_nogt"
    # by the run's contract on one, flip-averaged as labelIds on another
    run_predict("--model", setup["run"], "--input", str(photos[0]), "--output", str(tmp_path / "resize"))
    run_predict("--model", setup["run"], "--input", str(photos[-1]), "--output", str(tmp_path / "slide"),
                "--flip", "--format", "cityscapes-labelids")
    height, width = read_rgb(photos[0]).shape[:2]
    assert (height, width) == (1024, 2048)
    assert read_rgb(tmp_path / "resize" / f"{photos[0].stem}_mask.png").shape == (1024, 2048, 3)
    assert read_rgb(tmp_path / "resize" / f"{photos[0].stem}_panel.png").shape == (512, 2 * 1024 + 4, 3)
    prefix = photos[-1].stem.replace("_leftImg8bit", "")
    label_ids = cv2.imread(str(tmp_path / "slide" / f"{prefix}_pred_labelIds.png"), cv2.IMREAD_UNCHANGED)
    assert label_ids.shape == (1024, 2048)


def test_cityscapes_labelids_ground_truth_is_mapped_to_train_ids(setup, tmp_path):
    name = "lindau_000000_000002_leftImg8bit"
    image, mask = setup["scenes"][name]
    to_label_id = np.zeros(256, np.uint8)  # trainId -> labelId, ignore -> 0 ('unlabeled')
    for label in CITYSCAPES_LABELS:
        if 0 <= label.train_id < 255:
            to_label_id[label.train_id] = label.id
    gt = tmp_path / "gtFine" / "val" / "lindau"
    gt.mkdir(parents=True)
    cv2.imwrite(str(gt / "lindau_000000_000002_gtFine_labelIds.png"), to_label_id[mask])
    run_predict("--model", setup["run"], "--input", str(setup["photos"] / f"{name}.jpg"), "--output",
                str(tmp_path / "out"), "--gt", str(tmp_path / "gtFine"))
    panel = read_rgb(tmp_path / "out" / f"{name}_panel.png")
    colors = np.zeros((256, 3), np.uint8)
    colors[:19] = SPACE.class_colors
    np.testing.assert_array_equal(panel[:, 2 * PHOTO_SIZE[1] + 8:], colors[mask])


def class_ids_of_mask_png(path):
    """Class ids back from a colour-coded mask PNG (the label space's colours are distinct)."""
    mask = read_rgb(path).astype(np.int64)
    colors = np.array(SPACE.class_colors, np.int64)
    matches = (mask[..., None, :] == colors).all(-1)
    assert matches.any(-1).all()
    return matches.argmax(-1)


def test_exif_orientation_is_applied(setup, tmp_path):
    from PIL import Image

    image, _ = setup["scenes"]["lindau_000000_000002_leftImg8bit"]
    stored = image[:64, :128]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "turned.jpg", quality=95, exif=exif)
    raw = cv2.imdecode(np.fromfile(str(tmp_path / "turned.jpg"), np.uint8),
                       cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)[:, :, ::-1]
    assert raw.shape == (64, 128, 3)
    upright = np.ascontiguousarray(np.rot90(raw, k=-1))
    cv2.imwrite(str(tmp_path / "upright.png"), upright[:, :, ::-1])
    run_predict("--model", setup["run"], "--input", str(tmp_path / "turned.jpg"), str(tmp_path / "upright.png"),
                "--output", str(tmp_path / "out"))
    turned = class_ids_of_mask_png(tmp_path / "out" / "turned_mask.png")
    assert turned.shape == (128, 64)  # as a photo viewer shows it
    np.testing.assert_array_equal(turned, class_ids_of_mask_png(tmp_path / "out" / "upright_mask.png"))


def test_the_export_serves_what_predict_writes(setup, tmp_path):
    from keras_seg import export

    saved = export.export_saved_model(setup["run"], tmp_path / "models", log=lambda _: None)
    run_predict("--model", setup["run"], "--input", str(setup["photos"]), "--output", str(tmp_path / "out"))
    serving = tf.saved_model.load(saved).signatures["serving_default"]
    for name, suffix in (("frankfurt/frankfurt_000000_000001_leftImg8bit", ".png"),
                         ("lindau_000000_000002_leftImg8bit", ".jpg")):
        encoded = (setup["photos"] / f"{name}{suffix}").read_bytes()
        served = serving(images=tf.constant([encoded]))["class_ids"].numpy()[0]
        written = class_ids_of_mask_png(tmp_path / "out" / f"{name}_mask.png")
        assert served.shape == written.shape == PHOTO_SIZE
        assert np.mean(served == written) >= 0.999  # float32 graphs of one model: rare ties at most
