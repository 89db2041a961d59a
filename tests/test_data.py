"""keras_seg.data: reading TFRecord directories into (image, mask) batches."""

import hashlib
import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_seg import data, distribute, tfrecord

IGNORE = 255
# Class k is drawn in colour PALETTE[k] (none of them black, the padding colour).
PALETTE = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30], [30, 200, 200]], np.uint8)


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _example(rng, height, width, image_format="png", block=8):
    """A mask of class blocks (some ignore) and an image whose colours encode the classes."""
    blocks = rng.integers(0, len(PALETTE), size=(height // block + 1, width // block + 1))
    mask = np.kron(blocks, np.ones((block, block), np.int64))[:height, :width].astype(np.uint8)
    image = PALETTE[mask]
    mask[:4, :4] = IGNORE  # an ignored corner, drawn in the class colour underneath
    encoded = _png(image) if image_format == "png" else _jpeg(image)
    return image, mask, encoded


def write_dataset(directory, splits, *, num_shards=2, seed=0, block=8):
    """Write a small keras-seg directory with the format's own writer.

    splits: {name: [(height, width, image_format), ...]}. Returns {name: [(image, mask), ...]}.
    """
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays, split_info = {}, {}
    for split, sizes in splits.items():
        writer = tfrecord.ShardedWriter(str(directory), split, num_examples=len(sizes), num_shards=num_shards)
        arrays[split] = []
        for position, (height, width, image_format) in enumerate(sizes):
            image, mask, encoded = _example(rng, height, width, image_format, block)
            filename = f"{split}/{position}.png"
            writer.write(tfrecord.encode_example(encoded, image_format, _png(mask), height, width, filename), position)
            arrays[split].append((image, mask))
        writer.close()
        split_info[split] = {"num_examples": len(sizes), "shards": writer.commit()}
    common = {"label_space": "test", "num_classes": len(PALETTE), "class_names": [f"c{i}" for i in range(5)],
              "class_colors": PALETTE.tolist(), "ignore_index": IGNORE}
    tfrecord.write_dataset_info(str(directory), tfrecord.merged_dataset_info(None, common, split_info))
    return arrays


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tfr")
    arrays = write_dataset(directory, {
        "train": [(32, 48, "png")] * 6 + [(24, 40, "jpeg")] * 4,
        "val": [(32, 48, "png"), (24, 40, "png"), (32, 48, "jpeg")],
    })
    return directory, arrays


def _batches(ds):
    return [(images.numpy(), masks.numpy()) for images, masks in ds]


def _decode_classes(images):
    """Class of each pixel from its colour (nearest palette entry), images float in [0, 1]."""
    pixels = np.round(images * 255.0)
    distance = ((pixels[..., None, :] - PALETTE.astype(np.float64)) ** 2).sum(-1)
    return distance.argmin(-1)


def test_training_batches_have_fixed_shape_and_dtypes(dataset_dir):
    directory, _ = dataset_dir
    ds = data.build_dataset(directory, "train", training=True, batch_size=4, image_size=(16, 24), shuffle_seed=1)
    assert ds.element_spec[0].shape.as_list() == [4, 16, 24, 3]
    assert ds.element_spec[1].shape.as_list() == [4, 16, 24]
    batches = _batches(ds)
    assert len(batches) == 2  # 10 examples, whole batches only
    for images, masks in batches:
        assert images.dtype == np.float32 and masks.dtype == np.uint8
        assert images.min() >= 0.0 and images.max() <= 1.0
        assert set(np.unique(masks)) <= set(range(len(PALETTE))) | {IGNORE}  # nearest resize: no new values


def test_full_resolution_evaluation_keeps_each_size(dataset_dir):
    directory, arrays = dataset_dir
    ds = data.build_dataset(directory, "val", training=False, batch_size=1)
    batches = _batches(ds)
    assert sorted(m.shape for _, m in batches) == sorted((1, *m.shape) for _, m in arrays["val"])
    for _, masks in batches:  # PNG examples come back exactly
        match = [m for _, m in arrays["val"] if m.shape == masks.shape[1:] and np.array_equal(m, masks[0])]
        assert match


def test_full_resolution_batches_pad_masks_with_ignore(dataset_dir):
    directory, _ = dataset_dir
    (images, masks), *_ = _batches(data.build_dataset(directory, "val", training=False, batch_size=3))
    assert masks.shape == (3, 32, 48)
    small = [i for i in range(3) if (masks[i, 24:] == IGNORE).all() and (masks[i, :, 40:] == IGNORE).all()]
    assert len(small) == 1
    assert (images[small[0], 24:] == 0).all()


def test_crop_mode_pads_with_ignore_never_a_class(tmp_path):
    write_dataset(tmp_path, {"train": [(20, 30, "png")] * 4}, num_shards=1)
    ds = data.build_dataset(tmp_path, "train", training=True, batch_size=4, image_size=(28, 36),
                            resize_mode="crop", shuffle_seed=0)
    images, masks = _batches(ds)[0]
    # 8 rows and 6 columns of padding, centred: none of it may be a class.
    assert (masks[:, :4] == IGNORE).all() and (masks[:, -4:] == IGNORE).all()
    assert (masks[:, :, :3] == IGNORE).all() and (masks[:, :, -3:] == IGNORE).all()
    assert (images[:, :4] == 0).all()
    labelled = masks != IGNORE
    assert (_decode_classes(images)[labelled] == masks[labelled]).all()  # no resampling: exact


def test_crop_mode_random_crops_stay_aligned(tmp_path):
    write_dataset(tmp_path, {"train": [(40, 64, "png")] * 8}, num_shards=1)
    ds = data.build_dataset(tmp_path, "train", training=True, batch_size=8, image_size=(16, 16),
                            resize_mode="crop", shuffle_seed=3)
    images, masks = _batches(ds)[0]
    labelled = masks != IGNORE
    assert (_decode_classes(images)[labelled] == masks[labelled]).all()


def test_fit_mode_keeps_aspect_and_pads_with_ignore(tmp_path):
    arrays = write_dataset(tmp_path, {"val": [(20, 40, "png")]}, num_shards=1)
    images, masks = _batches(data.build_dataset(tmp_path, "val", training=False, batch_size=1, image_size=(40, 40),
                                                resize_mode="fit"))[0]
    # 20x40 -> 40x80 does not fit; 20x40 fits as is: 10 rows of ignore above and below.
    assert (masks[0, :10] == IGNORE).all() and (masks[0, 30:] == IGNORE).all()
    np.testing.assert_array_equal(masks[0, 10:30], arrays["val"][0][1])


def test_resize_mode_resamples_masks_nearest(tmp_path):
    write_dataset(tmp_path, {"val": [(32, 48, "png")]}, num_shards=1)
    images, masks = _batches(data.build_dataset(tmp_path, "val", training=False, batch_size=1, image_size=(13, 29)))[0]
    assert masks.shape == (1, 13, 29)
    assert set(np.unique(masks)) <= set(range(len(PALETTE))) | {IGNORE}


def test_seeded_shuffle_is_reproducible(dataset_dir):
    directory, _ = dataset_dir

    def first_epoch(seed):
        ds = data.build_dataset(directory, "train", training=True, batch_size=2, image_size=(24, 40), shuffle_seed=seed)
        return np.concatenate([m for _, m in _batches(ds)])

    np.testing.assert_array_equal(first_epoch(5), first_epoch(5))
    assert not np.array_equal(first_epoch(5), first_epoch(6))


def test_cache_and_repeat(dataset_dir, tmp_path):
    directory, _ = dataset_dir
    for cache in ("memory", str(tmp_path / "cache")):
        ds = data.build_dataset(directory, "val", training=True, batch_size=3, image_size=(24, 40), shuffle_seed=0,
                                cache=cache, repeat=True)
        epochs = [np.sort(masks.reshape(3, -1), axis=0) for _, masks in ds.take(4).as_numpy_iterator()]
        for epoch in epochs[1:]:  # 3 examples, batch 3: every batch is one epoch, reshuffled
            np.testing.assert_array_equal(np.sort(epoch.sum(1)), np.sort(epochs[0].sum(1)))
    # One prefix for two splits and two sizes: separate files, each read back as its own.
    prefix = str(tmp_path / "shared")
    for split, size in (("train", (24, 40)), ("val", (24, 40)), ("val", (16, 16))):
        for _ in range(2):  # the second pass reads the cache
            masks = [m for _, m in _batches(data.build_dataset(directory, split, training=False, batch_size=1,
                                                               image_size=size, cache=prefix))]
            assert masks[0].shape == (1, *size)
    assert len({name.split(".")[0] for name in os.listdir(tmp_path) if name.startswith("shared")}) == 3


def test_input_context_splits_the_examples(dataset_dir):
    directory, _ = dataset_dir
    seen = []
    for pipeline in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline, num_replicas_in_sync=2)
        ds = data.build_dataset(directory, "val", training=False, batch_size=2, image_size=(24, 40),
                                input_context=context)
        seen.append([m for _, masks in _batches(ds) for m in masks])
        assert all(masks.shape[0] == 1 for _, masks in _batches(ds))  # per-replica batch: 2 / 2
    assert len(seen[0]) + len(seen[1]) == 3 and min(len(s) for s in seen) >= 1


def test_mirrored_strategy_two_logical_cpus(dataset_dir):
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    directory, _ = dataset_dir
    dist = data.distribute_dataset(strategy, directory, "train", batch_size=4, training=True, image_size=(16, 24),
                                   shuffle_seed=0)

    @tf.function
    def step(images, masks):
        def replica_fn(x, y):
            return tf.shape(x)[0], tf.reduce_sum(tf.cast(y != IGNORE, tf.int32))

        return strategy.run(replica_fn, args=(images, masks))

    steps = 0
    for images, masks in dist:
        sizes, _ = step(images, masks)
        assert [int(s) for s in strategy.experimental_local_results(sizes)] == [2, 2]
        devices = {t.device for t in strategy.experimental_local_results(images)}
        assert len(devices) == 2
        steps += 1
    assert steps == 2
    with pytest.raises(ValueError, match="split over"):
        data.distribute_dataset(strategy, directory, "train", batch_size=3, training=True, image_size=(16, 24))


# --------------------------------------------------------------------------- errors


def test_error_missing_directory_and_info(tmp_path):
    with pytest.raises(tfrecord.DatasetFormatError, match="no such directory"):
        data.build_dataset(tmp_path / "absent", "train", training=False, batch_size=1)
    with pytest.raises(tfrecord.DatasetFormatError, match="dataset_info.json"):
        data.build_dataset(tmp_path, "train", training=False, batch_size=1)


def test_error_unknown_split_and_no_shards(dataset_dir, tmp_path):
    directory, _ = dataset_dir
    with pytest.raises(tfrecord.DatasetFormatError, match="no split 'test'.*train"):
        data.build_dataset(directory, "test", training=False, batch_size=1)
    info = tfrecord.load_dataset_info(str(directory))
    with open(tmp_path / tfrecord.DATASET_INFO_NAME, "w") as f:
        json.dump(info, f)
    with pytest.raises(tfrecord.DatasetFormatError, match="no shards for split 'train'"):
        data.build_dataset(tmp_path, "train", training=False, batch_size=1)


def test_error_records_not_in_the_format(tmp_path):
    write_dataset(tmp_path, {"train": [(8, 8, "png")]}, num_shards=1)
    shard = tmp_path / tfrecord.existing_shards(str(tmp_path), "train")[0]
    other = tf.train.Example(features=tf.train.Features(feature={
        "image_raw": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x"]))}))
    with tf.io.TFRecordWriter(str(shard)) as writer:
        writer.write(other.SerializeToString())
    with pytest.raises(tfrecord.DatasetFormatError, match="lacks the keys.*image/encoded"):
        data.build_dataset(tmp_path, "train", training=True, batch_size=1, image_size=(8, 8))
    shard.write_bytes(b"this is not a tfrecord file at all")
    with pytest.raises(tfrecord.DatasetFormatError, match="not a TFRecord file"):
        data.build_dataset(tmp_path, "train", training=True, batch_size=1, image_size=(8, 8))


def test_error_bad_arguments(dataset_dir):
    directory, _ = dataset_dir
    with pytest.raises(ValueError, match="image_size"):
        data.build_dataset(directory, "train", training=True, batch_size=2)
    with pytest.raises(ValueError, match="resize_mode"):
        data.build_dataset(directory, "train", training=True, batch_size=2, image_size=(8, 8), resize_mode="zoom")


# --------------------------------------------------------------------------- real data


def test_real_cityscapes_pairs(shared_data, tmp_path):
    """A few real pairs (photo | colour mask), converted with the format's writer, read back."""
    from keras_seg.labels import cityscapes_color_table

    pairs = sorted((shared_data / "cityscapes_pairs" / "train").glob("*.jpg"))[:4]
    if not pairs:
        pytest.skip("no cityscapes_pairs JPEGs")
    colors, classes = cityscapes_color_table("trainid")
    writer = tfrecord.ShardedWriter(str(tmp_path), "train", num_examples=len(pairs), num_shards=1)
    for position, path in enumerate(pairs):
        pair = np.asarray(Image.open(path).convert("RGB"))
        width = pair.shape[1] // 2
        photo, colour = pair[:, :width], pair[:, width:].astype(np.int32)
        nearest = ((colour[..., None, :] - colors.astype(np.int32)) ** 2).sum(-1).argmin(-1)
        mask = classes[nearest]
        writer.write(tfrecord.encode_example(_jpeg(photo), "jpeg", _png(mask), *mask.shape, path.name), position)
    writer.close()
    common = {"label_space": "trainid", "num_classes": 19, "class_names": [str(i) for i in range(19)],
              "ignore_index": IGNORE}
    tfrecord.write_dataset_info(str(tmp_path), tfrecord.merged_dataset_info(None, common, {
        "train": {"num_examples": len(pairs), "shards": writer.commit()}}))
    ds = data.build_dataset(tmp_path, "train", training=True, batch_size=2, image_size=(128, 128), shuffle_seed=0)
    for images, masks in _batches(ds):
        assert images.shape == (2, 128, 128, 3) and masks.shape == (2, 128, 128)
        assert set(np.unique(masks)) <= set(range(19)) | {IGNORE}


def _key(image):
    """Identifies an example: its images are random class-colour blocks."""
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


@pytest.mark.parametrize("cache, resize_mode", [(None, "crop"), ("memory", "crop"), ("memory", "scale_crop")])
def test_training_stream_resumes_at_any_example(tmp_path, cache, resize_mode):
    """The stream begun at example k equals the stream begun at 0 after k examples: same examples,
    same order, same random crops, across pass boundaries (10 examples a pass)."""
    write_dataset(tmp_path, {"train": [(32, 48, "png")] * 10}, num_shards=3)
    common = dict(training=True, repeat=True, batch_size=3, image_size=(24, 32), resize_mode=resize_mode,
                  base_scale=(32, 48), shuffle_seed=5, shuffle_buffer=4, cache=cache)
    whole = [b[0].numpy() for b in data.build_dataset(tmp_path, "train", **common).take(12)]
    for start_batch in (2, 3, 7):  # 6, 9 (mid-pass), 21 examples (third pass)
        resumed = data.build_dataset(tmp_path, "train", start_example=3 * start_batch, **common)
        got = [b[0].numpy() for b in resumed.take(12 - start_batch)]
        for i, batch in enumerate(got):
            np.testing.assert_array_equal(batch, whole[start_batch + i], err_msg=f"start {start_batch}, batch {i}")
    # and the passes differ from one another (a new shuffle each pass)
    keys = [_key(image) for batch in whole for image in batch]
    assert keys[:10] != keys[10:20]


def test_training_pipelines_read_disjoint_complete_records(tmp_path):
    """3 shards, 4 pipelines (fewer shards than pipelines: each keeps every 4th record of one common
    order): in every pass the pipelines' records are disjoint and together every record."""
    arrays = write_dataset(tmp_path, {"train": [(16, 16, "png")] * 12}, num_shards=3)
    expected = sorted(_key(image.astype(np.float32) / 255.0) for image, _ in arrays["train"])
    for epoch in range(2):
        seen = []
        for pipeline in range(4):
            context = tf.distribute.InputContext(num_input_pipelines=4, input_pipeline_id=pipeline,
                                                 num_replicas_in_sync=4)
            ds = data.build_dataset(tmp_path, "train", training=True, repeat=True, batch_size=4, image_size=(16, 16),
                                    shuffle_seed=3, input_context=context, start_example=3 * epoch)
            seen += [_key(b[0].numpy()[0]) for b in ds.take(3)]
        assert sorted(seen) == expected, f"pass {epoch}"


# --------------------------------------------------------------------------- random rescale + crop


def _interior_agreement(images, masks):
    """(share of labelled pixels whose 3x3 mask neighbourhood is one class, the colour's class == the mask's there).

    Bilinear resampling blends colours across class borders; inside a block it cannot, so there the
    image's colour must name the mask's class exactly, and a shifted or rescaled mask would not.
    """
    classes = _decode_classes(images)
    padded = np.pad(masks, ((0, 0), (1, 1), (1, 1)), constant_values=IGNORE)
    same = np.ones(masks.shape, bool)
    for dy in range(3):
        for dx in range(3):
            same &= padded[:, dy:dy + masks.shape[1], dx:dx + masks.shape[2]] == masks
    interior = same & (masks != IGNORE)
    return interior.mean(), bool((classes[interior] == masks[interior]).all())


@pytest.mark.parametrize("sizes, base_scale, crop, block", [
    ([(1024, 2048, "png")] * 3, (1024, 2048), (256, 512), 64),  # Cityscapes-sized frames
    ("voc", (512, 2048), (256, 256), 32),  # VOC-like: each image its own size
])
def test_scale_crop_keeps_image_and_mask_aligned(tmp_path, sizes, base_scale, crop, block):
    if sizes == "voc":
        rng = np.random.default_rng(11)
        sizes = [(int(rng.integers(250, 501)), int(rng.integers(250, 501)), "png") for _ in range(6)]
    write_dataset(tmp_path, {"train": sizes}, num_shards=2, block=block)
    ds = data.build_dataset(tmp_path, "train", training=True, repeat=True, batch_size=len(sizes), image_size=crop,
                            resize_mode="scale_crop", base_scale=base_scale, ratio_range=(0.5, 2.0), shuffle_seed=2)
    for images, masks in _batches(ds.take(2)):
        assert images.shape == (len(sizes), *crop, 3) and masks.shape == (len(sizes), *crop)
        share, agree = _interior_agreement(images, masks)
        assert share > 0.3 and agree
    # every reader mode keeps them aligned too
    for mode in ("resize", "crop", "fit"):
        ds = data.build_dataset(tmp_path, "train", training=True, batch_size=len(sizes), image_size=crop,
                                resize_mode=mode, shuffle_seed=2)
        share, agree = _interior_agreement(*_batches(ds.take(1))[0])
        assert share > 0.3 and agree, mode


@pytest.mark.parametrize("ratio", [0.5, 1.0, 1.5])
def test_scale_crop_rescales_the_whole_image_by_the_ratio_of_the_base_scale(ratio):
    """At a fixed ratio, the crop is a window of the whole mask resized (nearest) so that its long side is
    at most max(base_scale) x ratio and its short side at most min(base_scale) x ratio (aspect kept)."""
    rng = np.random.default_rng(int(ratio * 10))
    _, mask, _ = _example(rng, 40, 60, block=2)
    image = PALETTE[np.where(mask == IGNORE, 0, mask)]
    # 40x60 within 20x40 x ratio: the short side binds (20 x ratio / 40), the long one would allow more.
    expected_size = (round(40 * 20 * ratio / 40), round(60 * 20 * ratio / 40))
    whole = tf.image.resize(mask[..., None], expected_size, method="nearest").numpy()[..., 0]
    crop = (8, 8)
    for seed in range(3):
        _, got = data.random_scale_crop_example(tf.constant(image), tf.constant(mask), crop, (20, 40), (ratio, ratio),
                                                tf.constant([seed, 1], tf.int64))
        got = got.numpy()
        windows = [(y, x) for y in range(expected_size[0] - crop[0] + 1) for x in range(expected_size[1] - crop[1] + 1)
                   if np.array_equal(whole[y:y + crop[0], x:x + crop[1]], got)]
        assert windows, (ratio, seed)


def test_cat_max_ratio_retries_crops_dominated_by_one_class():
    # Class 1 is a 24-pixel band at the right, class 0 the rest: about 1 random 16x16 crop in 7 has
    # both and neither over 75% of its pixels; with up to 10 tries, most crops do.
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 40:] = 1
    image = PALETTE[mask]

    def varied(crop):
        counts = np.bincount(crop.ravel(), minlength=2)
        return (counts > 0).sum() > 1 and counts.max() < 0.75 * counts.sum()

    plain = retried = 0
    for seed in range(40):
        common = (tf.constant(image), tf.constant(mask), (16, 16), (64, 64), (1.0, 1.0), tf.constant([seed, 0]))
        plain += varied(data.random_scale_crop_example(*common)[1].numpy())
        retried += varied(data.random_scale_crop_example(*common, cat_max_ratio=0.75)[1].numpy())
    assert plain <= 12 and retried >= 24, (plain, retried)


@pytest.mark.parametrize("cache", ["memory", "file"])
def test_scale_crop_after_the_cache_differs_between_epochs(tmp_path, cache):
    write_dataset(tmp_path / "data", {"train": [(96, 160, "png")]}, num_shards=1, block=16)
    (tmp_path / "cache").mkdir()
    cache = "memory" if cache == "memory" else str(tmp_path / "cache" / "c")
    ds = data.build_dataset(tmp_path / "data", "train", training=True, repeat=True, batch_size=1, image_size=(32, 32),
                            resize_mode="scale_crop", base_scale=(96, 160), shuffle_seed=0, cache=cache)
    epochs = [masks[0] for _, masks in _batches(ds.take(4))]  # one example: a batch is an epoch
    assert all(not np.array_equal(epochs[0], other) for other in epochs[1:])
    if cache != "memory":  # the cache holds the decoded original, not a crop
        assert any("-full-" in name for name in os.listdir(tmp_path / "cache"))
