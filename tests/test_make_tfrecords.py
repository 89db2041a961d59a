"""Dataset conversion: every source format, its label mapping, and every bad input.

Expectations are independent of the code under test: hand-written id tables, masks painted by the
tests, and the real samples in ../shared/data where present.
"""

import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from keras_seg import tfrecord
from pipelines.cli import main as make_tfrecords

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Cityscapes labelId -> trainId for the 19 trainable classes, written out by hand (cityscapesScripts).
TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
             27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# labelId -> category index (flat 0, construction 1, object 2, nature 3, sky 4, human 5, vehicle 6),
# with void and the ids ignored in evaluation (parking 9, rail track 10, guard rail 14, bridge 15,
# tunnel 16, polegroup 18, caravan 29, trailer 30) -> 255.
CATEGORY_IDS = {7: 0, 8: 0, 11: 1, 12: 1, 13: 1, 17: 2, 19: 2, 20: 2, 21: 3, 22: 3, 23: 4, 24: 5, 25: 5,
                26: 6, 27: 6, 28: 6, 31: 6, 32: 6, 33: 6}


def reference_map(label_ids, table):
    out = np.full(label_ids.shape, 255, np.uint8)
    for raw, cls in table.items():
        out[label_ids == raw] = cls
    return out


def run(*args):
    return make_tfrecords([str(a) for a in args] + ["--no-progress"])


def read_split(directory, split):
    """-> list of (image RGB, mask, filename, raw record dict) from a converted split."""
    info = tfrecord.load_dataset_info(str(directory))
    out = []
    for shard in info["splits"][split]["shards"]:
        for record in tfrecord.read_records(os.path.join(directory, shard)):
            image, mask, name = tfrecord.decode_arrays(record)
            out.append((image, mask, name, tfrecord.decode_example(record)))
    return out


def leftover_files(directory):
    """Shards or temporary files in `directory` (there should be none after a failed run)."""
    if not os.path.isdir(directory):
        return []
    return [n for n in os.listdir(directory) if n.endswith((".tfrecord", ".partial"))]


def write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), array)


# --------------------------------------------------------------------------- fixtures


def make_cityscapes(root, frames=(("train", "aachen", 3), ("val", "frankfurt", 2)), size=(24, 32), seed=0):
    """Official layout with random photos and labelId masks holding every id 0..33."""
    rng = np.random.default_rng(seed)
    masks = {}
    for split, city, count in frames:
        for i in range(count):
            frame = f"{city}_{i:06d}_000019"
            photo = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            label_ids = rng.integers(0, 34, size, dtype=np.uint8)
            write_png(root / "leftImg8bit" / split / city / f"{frame}_leftImg8bit.png", photo)
            write_png(root / "gtFine" / split / city / f"{frame}_gtFine_labelIds.png", label_ids)
            masks[f"leftImg8bit/{split}/{city}/{frame}_leftImg8bit.png"] = label_ids
    return masks


@pytest.fixture
def cityscapes(tmp_path):
    root = tmp_path / "cityscapes"
    return root, make_cityscapes(root)


# --------------------------------------------------------------------------- cityscapes


@pytest.mark.parametrize("space,table", [("trainid", TRAIN_IDS), ("category", CATEGORY_IDS)])
def test_cityscapes_label_spaces(cityscapes, tmp_path, space, table):
    root, masks = cityscapes
    out = tmp_path / "out"
    assert run("cityscapes", "--input", root, "--output", out, "--label-space", space, "--workers", 1) == 0
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["num_classes"] == (19 if space == "trainid" else 7)
    assert set(info["splits"]) == {"train", "val"}
    for split, count in (("train", 3), ("val", 2)):
        examples = read_split(out, split)
        assert len(examples) == count == info["splits"][split]["num_examples"]
        for _, mask, name, record in examples:
            np.testing.assert_array_equal(mask, reference_map(masks[name], table))
            # PNG photos are stored as their original bytes.
            with open(root / name, "rb") as f:
                assert record[tfrecord.IMAGE_ENCODED] == f.read()
            assert record[tfrecord.IMAGE_FORMAT] == b"png"
    # class pixel counts agree with the masks
    expected = np.zeros(info["num_classes"], np.int64)
    for name, raw in masks.items():
        if name.startswith("leftImg8bit/train"):
            mapped = reference_map(raw, table)
            expected += np.bincount(mapped[mapped != 255], minlength=info["num_classes"])
    assert info["splits"]["train"]["class_pixel_counts"] == expected.tolist()


def test_cityscapes_labelid_space_keeps_raw_ids(cityscapes, tmp_path):
    root, masks = cityscapes
    assert run("cityscapes", "--input", root, "--output", tmp_path / "o", "--label-space", "labelid",
               "--split", "val", "--workers", 1) == 0
    for _, mask, name, _ in read_split(tmp_path / "o", "val"):
        np.testing.assert_array_equal(mask, masks[name])


def test_cityscapes_real_sample_matches_table_and_shipped_train_ids(shared_data, tmp_path):
    root = shared_data / "cityscapes_official_sample"
    assert run("cityscapes", "--input", root, "--output", tmp_path / "o", "--workers", 1) == 0
    [(image, mask, name, _)] = read_split(tmp_path / "o", "val")
    gt_dir = root / "gtFine" / "val" / "frankfurt"
    label_ids = np.array(Image.open(gt_dir / "frankfurt_000000_000294_gtFine_labelIds.png"))
    shipped = np.array(Image.open(gt_dir / "frankfurt_000000_000294_gtFine_labelTrainIds.png"))
    np.testing.assert_array_equal(mask, reference_map(label_ids, TRAIN_IDS))
    assert (mask == shipped).mean() >= 0.997
    assert image.shape == (128, 256, 3)


# --------------------------------------------------------------------------- VOC


def test_voc_real_sample_reads_palette_indices(shared_data, tmp_path):
    root = shared_data / "voc2012_sample"
    assert run("voc", "--input", root, "--output", tmp_path / "o", "--workers", 1) == 0
    info = tfrecord.load_dataset_info(str(tmp_path / "o"))
    assert set(info["splits"]) == {"train", "val", "trainval"}
    [(image, mask, name, record)] = read_split(tmp_path / "o", "train")
    assert name == "JPEGImages/2007_000063.jpg"
    assert set(np.unique(mask).tolist()) == {0, 9, 12, 255}  # background, chair, dog, void
    assert record[tfrecord.IMAGE_FORMAT] == b"jpeg"
    assert image.shape[:2] == mask.shape


def make_voc(root, ids=("a", "b"), listed=None, mask_ids=None):
    """VOC layout whose palette masks have deliberately *wrong* colours: only the indices mean anything."""
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    (voc / "SegmentationClass").mkdir()
    rng = np.random.default_rng(1)
    masks = {}
    for image_id in ids:
        cv2.imwrite(str(voc / "JPEGImages" / f"{image_id}.jpg"), rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
        if mask_ids is None or image_id in mask_ids:
            values = rng.choice([0, 3, 15, 20, 255], size=(20, 30)).astype(np.uint8)
            img = Image.fromarray(values, mode="P")
            img.putpalette(list(rng.integers(0, 256, 768, dtype=np.uint8)))
            img.save(voc / "SegmentationClass" / f"{image_id}.png")
            masks[image_id] = values
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(listed or ids) + "\n")
    return voc, masks


def test_voc_layout_from_devkit_root(tmp_path):
    voc, masks = make_voc(tmp_path / "data")
    assert run("voc", "--input", tmp_path / "data" / "VOCdevkit", "--output", tmp_path / "o", "--workers", 1) == 0
    got = {name: mask for _, mask, name, _ in read_split(tmp_path / "o", "train")}
    for image_id, values in masks.items():
        np.testing.assert_array_equal(got[f"JPEGImages/{image_id}.jpg"], values)


def test_voc_segmentation_class_aug(shared_data, tmp_path):
    root = shared_data / "voc2012_sample"
    assert run("voc", "--input", root, "--output", tmp_path / "o", "--split", "val",
               "--voc-masks", "SegmentationClassAug", "--workers", 1) == 0
    [(_, mask, name, _)] = read_split(tmp_path / "o", "val")
    expected = np.array(Image.open(root / "VOCdevkit/VOC2012/SegmentationClassAug/2007_000129.png"))
    np.testing.assert_array_equal(mask, expected)
    assert {2, 15} <= set(np.unique(mask).tolist())  # bicycle, person


# --------------------------------------------------------------------------- cityscapes pairs


def colorize(train_ids):
    """trainIds -> Cityscapes colours (a hand-written copy of the 19 colours; 255 -> black)."""
    colors = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
              (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
              (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)]
    table = np.zeros((256, 3), np.uint8)
    table[: len(colors)] = colors
    return table[train_ids]


def test_pairs_recover_official_train_ids_through_jpeg(shared_data, tmp_path):
    sample = shared_data / "cityscapes_official_sample"
    photo = cv2.imread(str(sample / "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png"))
    train_ids = np.array(Image.open(sample / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelTrainIds.png"))
    pair = np.concatenate([photo, cv2.cvtColor(colorize(train_ids), cv2.COLOR_RGB2BGR)], axis=1)
    (tmp_path / "pairs" / "val").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "pairs" / "val" / "1.jpg"), pair, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert run("cityscapes-pairs", "--input", tmp_path / "pairs", "--output", tmp_path / "o", "--workers", 1) == 0
    [(image, mask, _, _)] = read_split(tmp_path / "o", "val")
    assert image.shape == photo.shape
    # Of the pixels labelled in both (JPEG noise at borders becomes 255), >= 97% get their class back,
    # and the distance limit keeps most labelled pixels.
    labelled = train_ids != 255
    kept = labelled & (mask != 255)
    assert (mask[kept] == train_ids[kept]).mean() >= 0.97
    assert kept.sum() >= 0.9 * labelled.sum()
    info = tfrecord.load_dataset_info(str(tmp_path / "o"))
    unmatched = info["splits"]["val"]["source_stats"]["color_unmatched_pixels"]
    assert 0 < unmatched < 0.2 * mask.size


@pytest.mark.parametrize("palette, max_distance", [
    ("cityscapes", 40.0),                  # the pairs converter's default
    ("three", 260.0),                      # a limit whose squared distances need more than 16 bits
])
def test_nearest_colour_mapping_equals_brute_force(palette, max_distance):
    from keras_seg.labels import cityscapes_color_table
    from pipelines.common import map_colors_nearest

    if palette == "cityscapes":
        colors, classes = cityscapes_color_table("trainid")
    else:
        colors, classes = np.array([[0, 0, 0], [250, 10, 10], [10, 250, 250]], np.uint8), np.array([4, 255, 0])
    rng = np.random.default_rng(0)
    # colours near the palette (JPEG-like noise, some beyond the limit) and anywhere in the cube
    near = colors[rng.integers(0, len(colors), 3000)].astype(np.int32) + rng.integers(-30, 31, (3000, 3))
    rgb = np.concatenate([np.clip(near, 0, 255), rng.integers(0, 256, (1000, 3))]).astype(np.uint8).reshape(80, 50, 3)
    mask, far = map_colors_nearest(rgb, colors, classes, max_distance)
    dist2 = ((rgb.reshape(-1, 1, 3).astype(np.int64) - colors.astype(np.int64)) ** 2).sum(-1)
    within = dist2.min(-1) <= max_distance**2
    expected = np.where(within, classes[dist2.argmin(-1)], 255).reshape(80, 50)  # ties: the first colour
    np.testing.assert_array_equal(mask, expected)
    assert far == int((~within).sum()) > 0  # the "too far" path is exercised too


def copy_pairs(shared_data, destination, count):
    (destination / "train").mkdir(parents=True)
    for i in range(1, count + 1):
        shutil.copy(shared_data / "cityscapes_pairs" / "train" / f"{i}.jpg", destination / "train" / f"{i}.jpg")


def test_pairs_real_files_and_contiguous_val_fraction(shared_data, tmp_path):
    copy_pairs(shared_data, tmp_path / "pairs", 10)
    assert run("cityscapes-pairs", "--input", tmp_path / "pairs", "--output", tmp_path / "o",
               "--val-fraction", "0.2", "--workers", 1) == 0
    train, val = read_split(tmp_path / "o", "train"), read_split(tmp_path / "o", "val")
    # numeric order, and val is the last block of it
    assert [n for *_, n, _ in train] == [f"train/{i}.jpg" for i in range(1, 9)]
    assert [n for *_, n, _ in val] == ["train/9.jpg", "train/10.jpg"]
    for image, mask, _, _ in train + val:
        assert image.shape == (256, 256, 3) and mask.shape == (256, 256)
        assert set(np.unique(mask).tolist()) <= set(range(19)) | {255}


def test_pairs_kaggle_layout_converts_train_and_val_as_they_come(shared_data, tmp_path):
    """The Kaggle download has train/ and val/: the README's command converts both, no --val-fraction."""
    copy_pairs(shared_data, tmp_path / "pairs", 4)
    (tmp_path / "pairs" / "val").mkdir()
    for i in (1, 2):
        source = shared_data / "cityscapes_pairs" / "train" / f"{i + 4}.jpg"
        shutil.copy(source, tmp_path / "pairs" / "val" / f"{i}.jpg")
    assert run("cityscapes-pairs", "--input", tmp_path / "pairs", "--output", tmp_path / "o", "--workers", 1) == 0
    assert [n for *_, n, _ in read_split(tmp_path / "o", "train")] == [f"train/{i}.jpg" for i in range(1, 5)]
    assert [n for *_, n, _ in read_split(tmp_path / "o", "val")] == ["val/1.jpg", "val/2.jpg"]


def test_pairs_category_label_space(shared_data, tmp_path):
    copy_pairs(shared_data, tmp_path / "pairs", 2)
    run("cityscapes-pairs", "--input", tmp_path / "pairs", "--output", tmp_path / "t", "--workers", 1)
    run("cityscapes-pairs", "--input", tmp_path / "pairs", "--output", tmp_path / "c", "--workers", 1,
        "--label-space", "category")
    to_category = np.full(256, 255, np.uint8)
    for train_id, category in enumerate([0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 5, 6, 6, 6, 6, 6, 6]):
        to_category[train_id] = category
    for (_, t, _, _), (_, c, _, _) in zip(read_split(tmp_path / "t", "train"), read_split(tmp_path / "c", "train")):
        np.testing.assert_array_equal(c, to_category[t])


# --------------------------------------------------------------------------- folder


def test_folder_subfolders_with_index_masks_and_class_file(tmp_path):
    rng = np.random.default_rng(2)
    masks = {}
    for stem in ("x1", "x2", "x10"):
        write_png(tmp_path / "d" / "images" / f"{stem}.png", rng.integers(0, 256, (8, 12, 3), dtype=np.uint8))
        masks[stem] = rng.choice([0, 1, 2, 255], size=(8, 12)).astype(np.uint8)
        write_png(tmp_path / "d" / "masks" / f"{stem}.png", masks[stem])
    (tmp_path / "classes.txt").write_text("# my classes\nbackground\nthing one 10 20 30\ncat 1 2 3\n")
    (tmp_path / "classes.txt").write_text("background 0 0 0\nthing one 10 20 30\ncat 1 2 3\n")
    assert run("folder", "--input", tmp_path / "d", "--output", tmp_path / "o", "--classes",
               tmp_path / "classes.txt", "--workers", 1) == 0
    info = tfrecord.load_dataset_info(str(tmp_path / "o"))
    assert info["class_names"] == ["background", "thing one", "cat"]
    assert info["class_colors"] == [[0, 0, 0], [10, 20, 30], [1, 2, 3]]
    got = read_split(tmp_path / "o", "train")
    assert [n for *_, n, _ in got] == ["images/x1.png", "images/x2.png", "images/x10.png"]
    for _, mask, name, _ in got:
        np.testing.assert_array_equal(mask, masks[os.path.splitext(os.path.basename(name))[0]])


def test_folder_voc_colour_masks_by_suffix(shared_data, tmp_path):
    src = shared_data / "voc_color_masks"
    assert run("folder", "--input", src, "--output", tmp_path / "o", "--image-suffix", "_image",
               "--mask-suffix", "_target", "--palette", "voc", "--workers", 1) == 0
    got = read_split(tmp_path / "o", "train")
    assert len(got) == 3
    # A few VOC colours written out by hand: black = background, (128,0,0) = aeroplane,
    # (192,128,128) = person, (224,224,192) = void.
    hand = {(0, 0, 0): 0, (128, 0, 0): 1, (192, 128, 128): 15, (224, 224, 192): 255}
    for _, mask, name, _ in got:
        colours = np.array(Image.open(src / name.replace("_image", "_target")).convert("RGB"))
        assert set(np.unique(mask).tolist()) <= set(range(21)) | {255}
        for colour, cls in hand.items():
            where = (colours == colour).all(-1)
            assert (mask[where] == cls).all()
        assert (mask == 255).any() and (mask == 0).any()


def test_folder_unknown_colour_is_an_error(tmp_path):
    write_png(tmp_path / "d" / "images" / "a.png", np.zeros((4, 4, 3), np.uint8))
    colour_mask = np.zeros((4, 4, 3), np.uint8)
    colour_mask[0, 0] = (1, 2, 3)
    write_png(tmp_path / "d" / "masks" / "a.png", colour_mask)
    assert run("folder", "--input", tmp_path / "d", "--output", tmp_path / "o", "--palette", "voc",
               "--workers", 1) == 1
    assert leftover_files(tmp_path / "o") == []


# --------------------------------------------------------------------------- tfds


def _mock_cityscapes(label_values):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (3, 16, 32, 3), dtype=np.uint8)
    labels = rng.choice(label_values, size=(3, 16, 32, 1)).astype(np.uint8)

    def as_dataset(self, *args, **kwargs):
        return tf.data.Dataset.from_tensor_slices(
            {"image_id": [b"a", b"b", b"c"], "image_left": images, "segmentation_label": labels}
        )

    return tfds.testing.mock_data(as_dataset_fn=as_dataset), images, labels


def test_tfds_cityscapes_with_mock_data(tmp_path):
    mock, images, labels = _mock_cityscapes([0, 7, 8, 24, 26, 33, 9])
    with mock:
        assert run("tfds", "--tfds-name", "cityscapes/semantic_segmentation", "--output", tmp_path / "o",
                   "--split", "train", "--workers", 1) == 0
    got = read_split(tmp_path / "o", "train")
    assert [n for *_, n, _ in got] == ["a", "b", "c"]
    for (image, mask, _, _), img, lab in zip(got, images, labels):
        np.testing.assert_array_equal(image, img)  # stored losslessly
        np.testing.assert_array_equal(mask, reference_map(lab[..., 0], TRAIN_IDS))


def test_tfds_validation_split_is_written_as_val(tmp_path):
    mock, images, _ = _mock_cityscapes([0, 7, 8, 24, 26, 33, 9])
    with mock:
        assert run("tfds", "--tfds-name", "cityscapes/semantic_segmentation", "--output", tmp_path / "o",
                   "--split", "validation", "--workers", 1) == 0
    info = json.loads((tmp_path / "o" / "dataset_info.json").read_text())
    assert sorted(info["splits"]) == ["val"]
    np.testing.assert_array_equal(read_split(tmp_path / "o", "val")[0][0], images[0])


def test_tfds_default_random_masks_are_rejected(tmp_path, capsys):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=2):  # random masks 0..254: not labelIds
        code = run("tfds", "--tfds-name", "cityscapes/semantic_segmentation", "--output", tmp_path / "o",
                   "--split", "train", "--workers", 1)
    assert code == 1
    assert "outside the 'trainid' label space" in capsys.readouterr().err
    assert leftover_files(tmp_path / "o") == []


# --------------------------------------------------------------------------- writer behaviour


def test_one_and_two_workers_write_identical_shards(cityscapes, tmp_path):
    root, _ = cityscapes
    assert run("cityscapes", "--input", root, "--output", tmp_path / "w1", "--workers", 1, "--num-shards", 2) == 0
    # 2 workers in a separate process, as the command line runs (workers forked before TensorFlow is
    # imported), and in this process, where TensorFlow is loaded (workers from a fork server): the
    # bytes must not depend on anything process-local
    # (and TensorFlow is never imported there: records are written without it)
    script = ("import sys; from pipelines.cli import main; code = main(sys.argv[1:]); "
              "print('TENSORFLOW', 'tensorflow' in sys.modules); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script, "cityscapes", "--input", str(root),
                           "--output", str(tmp_path / "w2"), "--workers", "2", "--num-shards", "2"],
                          check=True, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert "TENSORFLOW False" in done.stdout
    assert run("cityscapes", "--input", root, "--output", tmp_path / "w2b", "--workers", 2, "--num-shards", 2) == 0
    names = sorted(leftover_files(tmp_path / "w1"))
    assert names == ["train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord",
                     "val-00000-of-00002.tfrecord", "val-00001-of-00002.tfrecord"]
    for other in ("w2", "w2b"):
        assert sorted(leftover_files(tmp_path / other)) == names
        for name in names:
            assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / other / name).read_bytes()
        for split in ("train", "val"):  # the class index too (cells found by the workers, places by the writer)
            with np.load(tmp_path / "w1" / f"{split}-class-index.npz") as one, \
                    np.load(tmp_path / other / f"{split}-class-index.npz") as two:
                assert sorted(one.files) == sorted(two.files)
                for key in one.files:
                    np.testing.assert_array_equal(one[key], two[key])


def test_seeded_shuffle_is_a_permutation(cityscapes, tmp_path):
    root, masks = cityscapes
    run("cityscapes", "--input", root, "--output", tmp_path / "a", "--split", "train", "--shuffle-seed", 5,
        "--workers", 1)
    run("cityscapes", "--input", root, "--output", tmp_path / "b", "--split", "train", "--shuffle-seed", 5,
        "--workers", 1)
    names_a = [n for *_, n, _ in read_split(tmp_path / "a", "train")]
    names_b = [n for *_, n, _ in read_split(tmp_path / "b", "train")]
    assert names_a == names_b and sorted(names_a) == sorted(n for n in masks if "/train/" in n)


def test_resize_at_conversion_keeps_mask_labels(cityscapes, tmp_path):
    root, masks = cityscapes
    assert run("cityscapes", "--input", root, "--output", tmp_path / "o", "--size", "12x16", "--split", "val",
               "--image-format", "jpeg", "--label-space", "labelid", "--workers", 1) == 0
    for image, mask, name, record in read_split(tmp_path / "o", "val"):
        assert image.shape == (12, 16, 3) and mask.shape == (12, 16)
        assert record[tfrecord.IMAGE_FORMAT] == b"jpeg"
        assert (record[tfrecord.IMAGE_HEIGHT], record[tfrecord.IMAGE_WIDTH]) == (12, 16)
        # nearest-neighbour: a 2x downscale picks source pixels, never blends label ids
        assert set(np.unique(mask).tolist()) <= set(np.unique(masks[name]).tolist())
        # exactly one source pixel of each 2x2 block, at the same corner everywhere
        assert any(np.array_equal(mask, masks[name][dy::2, dx::2]) for dy in (0, 1) for dx in (0, 1))


def test_splits_merge_and_overwrite_replaces_one_split(cityscapes, tmp_path):
    root, _ = cityscapes
    out = tmp_path / "o"
    assert run("cityscapes", "--input", root, "--output", out, "--split", "train", "--workers", 1) == 0
    assert run("cityscapes", "--input", root, "--output", out, "--split", "val", "--workers", 1) == 0
    info = tfrecord.load_dataset_info(str(out))
    assert set(info["splits"]) == {"train", "val"}
    val_before = (out / "val-00000-of-00001.tfrecord").read_bytes()
    # an existing split is never overwritten silently
    assert run("cityscapes", "--input", root, "--output", out, "--split", "train", "--workers", 1) == 1
    assert run("cityscapes", "--input", root, "--output", out, "--split", "train", "--workers", 1,
               "--overwrite", "--num-shards", 3) == 0
    assert sorted(leftover_files(out)) == [f"train-0000{i}-of-00003.tfrecord" for i in range(3)] + [
        "val-00000-of-00001.tfrecord"]
    assert (out / "val-00000-of-00001.tfrecord").read_bytes() == val_before
    info = tfrecord.load_dataset_info(str(out))
    assert info["splits"]["train"]["num_examples"] == 3 and len(info["splits"]["train"]["shards"]) == 3
    # a different label space does not mix into the same directory
    assert run("cityscapes", "--input", root, "--output", out, "--split", "train", "--workers", 1,
               "--overwrite", "--label-space", "category") == 1


# --------------------------------------------------------------------------- bad input


def _break_missing_mask(root):
    os.remove(root / "gtFine/val/frankfurt/frankfurt_000001_000019_gtFine_labelIds.png")
    return "frankfurt_000001_000019_leftImg8bit.png", "has no mask"


def _break_missing_image(root):
    os.remove(root / "leftImg8bit/val/frankfurt/frankfurt_000001_000019_leftImg8bit.png")
    return "frankfurt_000001_000019_gtFine_labelIds.png", "has no image"


def _break_mask_size(root):
    write_png(root / "gtFine/val/frankfurt/frankfurt_000001_000019_gtFine_labelIds.png", np.zeros((5, 5), np.uint8))
    return "frankfurt_000001_000019_gtFine_labelIds.png", "mask is 5x5 but its image is 32x24"


def _break_label_value(root):
    write_png(root / "gtFine/val/frankfurt/frankfurt_000001_000019_gtFine_labelIds.png",
              np.full((24, 32), 40, np.uint8))
    return "frankfurt_000001_000019_gtFine_labelIds.png", "outside the 'trainid' label space: 40"


def _break_unreadable(root):
    (root / "leftImg8bit/val/frankfurt/frankfurt_000001_000019_leftImg8bit.png").write_bytes(b"\x89PNG garbage")
    return "frankfurt_000001_000019_leftImg8bit.png", "not a readable image"


def _break_empty_split(root):
    shutil.rmtree(root / "leftImg8bit/val/frankfurt")
    shutil.rmtree(root / "gtFine/val/frankfurt")
    return "cityscapes", "split 'val' is empty"


def _break_root(root):
    shutil.rmtree(root / "leftImg8bit")
    return "cityscapes", "no leftImg8bit/ folder"


@pytest.mark.parametrize("breaker", [_break_missing_mask, _break_missing_image, _break_mask_size, _break_label_value,
                                     _break_unreadable, _break_empty_split, _break_root])
def test_bad_input_stops_with_one_line_and_leaves_nothing(cityscapes, tmp_path, capsys, breaker):
    root, _ = cityscapes
    file_part, problem = breaker(root)
    out = tmp_path / "o"
    # train converts fine first; the failure in val must not leave train's shards behind either
    assert run("cityscapes", "--input", root, "--output", out, "--workers", 1) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert file_part in err[0] and problem in err[0]
    assert leftover_files(out) == []
    assert not (out / "dataset_info.json").exists()


def test_skip_bad_counts_and_reports(cityscapes, tmp_path):
    root, _ = cityscapes
    _break_unreadable(root)
    assert run("cityscapes", "--input", root, "--output", tmp_path / "o", "--workers", 1, "--skip-bad") == 0
    info = tfrecord.load_dataset_info(str(tmp_path / "o"))
    assert info["splits"]["val"]["num_examples"] == 1
    [skipped] = info["splits"]["val"]["skipped"]
    assert "frankfurt_000001_000019_leftImg8bit.png" in skipped and "not a readable image" in skipped


def test_command_line_exit_code_and_message(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "make_tfrecords.py"), "voc", "--input", str(tmp_path),
         "--output", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 1
    assert f"error: {tmp_path}: not a VOC folder" in result.stderr
    assert "Traceback" not in result.stderr
