"""Class-uniform sampling (issue 32 item 2): the converter's class index, and the training stream that
draws a share of its examples class-uniformly (keras_seg.data.build_dataset(class_uniform=P))."""

import os
import shutil

import cv2
import keras
import numpy as np
import pytest

from keras_seg import data, tfrecord
from keras_seg import train as train_cli
from keras_seg.config import ConfigError
from keras_seg.training.trainer import Trainer
from pipelines.class_index import add_class_index
from pipelines.cli import main as make_tfrecords

from test_train import write_tiny_data

IGNORE = 255


def png(array):
    ok, buf = cv2.imencode(".png", array)
    assert ok
    return buf.tobytes()


def write_records(directory, masks, num_classes, num_shards=2, index=True):
    """A train split of `masks` written with the format's own writer; each record's image holds its
    number in every pixel, so a batch shows which records it came from. `index`: add the class index."""
    os.makedirs(directory, exist_ok=True)
    writer = tfrecord.ShardedWriter(str(directory), "train", num_examples=len(masks), num_shards=num_shards)
    for number, mask in enumerate(masks):
        image = np.full(mask.shape + (3,), number, np.uint8)
        writer.write(tfrecord.encode_example(png(image), "png", png(mask), *mask.shape, f"r{number}"), number)
    writer.close()
    common = {"label_space": "test", "num_classes": num_classes, "class_names": [f"c{i}" for i in range(num_classes)],
              "ignore_index": IGNORE}
    splits = {"train": {"num_examples": len(masks), "shards": writer.commit()}}
    tfrecord.write_dataset_info(str(directory), tfrecord.merged_dataset_info(None, common, splits))
    if index:
        add_class_index(str(directory), log=lambda line: None)
    return str(directory)


def core_cells_reference(mask, value, grid=8):
    """The grid cells holding a pixel of `value` whose 3x3 neighbourhood inside the mask is all `value`:
    pixel by pixel, the definition written out."""
    height, width = mask.shape
    bits = 0
    for y in range(height):
        for x in range(width):
            window = mask[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2]
            if mask[y, x] == value and (window == value).all():
                bits |= 1 << ((y * grid // height) * grid + x * grid // width)
    return bits


# --------------------------------------------------------------------------- the index


def hand_masks():
    first = np.zeros((16, 16), np.uint8)
    first[:2, :2] = IGNORE
    first[4:8, 8:12] = 1  # core pixels rows 5-6, columns 9-10: grid rows 2-3, columns 4-5
    first[15, 0] = 2  # a lone pixel (JPEG noise in a colour mask): not presence
    second = np.full((10, 24), 3, np.uint8)
    second[:, 21:] = 0  # three columns 21-23: the core column 22 is grid column 22 * 8 // 24 = 7
    return [first, second]


def test_converter_writes_the_class_index_of_hand_made_masks(tmp_path):
    masks = hand_masks()
    for number, mask in enumerate(masks):
        os.makedirs(tmp_path / "src" / "images", exist_ok=True)
        os.makedirs(tmp_path / "src" / "masks", exist_ok=True)
        cv2.imwrite(str(tmp_path / "src" / "images" / f"{number}.png"), np.zeros(mask.shape + (3,), np.uint8))
        cv2.imwrite(str(tmp_path / "src" / "masks" / f"{number}.png"), mask)
    out = tmp_path / "out"
    assert make_tfrecords(["folder", "--input", str(tmp_path / "src"), "--output", str(out), "--num-classes", "4",
                           "--num-shards", "2", "--workers", "1", "--no-progress"]) == 0
    info = tfrecord.load_dataset_info(str(out))
    assert info["splits"]["train"]["class_index"] == "train-class-index.npz"
    assert info["splits"]["train"]["class_record_counts"] == [2, 1, 0, 1]  # class 2 only as a stray pixel
    index = tfrecord.load_class_index(str(out), "train")
    cells = index.cells.astype(object)
    # by hand
    assert cells[0, 1] == (1 << 20) | (1 << 21) | (1 << 28) | (1 << 29)
    assert cells[0, 2] == 0 and cells[0, 3] == 0 and cells[1, 1] == 0 and cells[1, 2] == 0
    assert cells[1, 0] == sum(1 << (8 * row + 7) for row in range(8))
    assert cells[0, 0] & 1 == 0  # cell (0, 0) holds the ignored corner and its neighbours only
    # every class against the definition, pixel by pixel
    for row, mask in enumerate(masks):
        assert [cells[row, c] for c in range(4)] == [core_cells_reference(mask, c) for c in range(4)]
    # each record is where the index says: its frame's length field, then the record
    for number in range(2):
        shard = os.path.join(out, index.shards[index.record_shards()[number]])
        with open(shard, "rb") as f:
            f.seek(int(index.offsets[number]))
            length = int.from_bytes(f.read(8), "little")
            f.read(4)
            record = f.read(length)
        assert length == index.lengths[number]
        assert tfrecord.decode_example(record)[tfrecord.IMAGE_FILENAME] == f"images/{number}.png".encode()

    # the index tool, on the same shards without the index, writes the same arrays
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    os.remove(copy / "train-class-index.npz")
    with pytest.raises(tfrecord.DatasetFormatError, match="has no class index"):
        tfrecord.load_class_index(str(copy), "train")
    assert make_tfrecords(["index", "--data", str(copy)]) == 0
    with np.load(out / "train-class-index.npz") as ours, np.load(copy / "train-class-index.npz") as tools:
        assert sorted(ours.files) == sorted(tools.files)
        for key in ours.files:
            np.testing.assert_array_equal(ours[key], tools[key])
    assert tfrecord.load_dataset_info(str(copy))["splits"] == info["splits"]


def test_index_tool_and_stale_index_errors(tmp_path, capsys):
    assert make_tfrecords(["index", "--data", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'none'}: no such directory"]
    directory = write_records(tmp_path / "d", hand_masks(), num_classes=4, num_shards=1)
    with open(os.path.join(directory, "train-00000-of-00001.tfrecord"), "ab") as f:
        f.write(b"\0")  # the shard changed after indexing
    with pytest.raises(tfrecord.DatasetFormatError, match="describes other shards") as caught:
        tfrecord.load_class_index(directory, "train")
    assert "\n" not in str(caught.value) and "tools/make_tfrecords.py index --data" in str(caught.value)


# --------------------------------------------------------------------------- the stream


def test_class_centre_is_a_core_pixel_of_the_class_in_the_cell_drawn():
    rng = np.random.default_rng(4)
    blocks = rng.integers(0, 3, size=(5, 7)).astype(np.uint8)
    mask = np.kron(blocks, np.ones((4, 4), np.uint8))[:19, :26]  # sides that are not multiples of the grid
    mask[rng.random(mask.shape) < 0.05] = 3  # stray pixels: never a centre while a core pixel is there
    cells = tfrecord.class_cells(mask)
    checked = 0
    for cls in range(3):
        for bit in range(64):
            if not int(cells[cls]) >> bit & 1:
                continue
            for seed in range(3):
                y, x = data.class_centre(mask, cls, np.int64(1 << bit if bit < 63 else -(1 << 63)), [seed, bit]).numpy()
                assert (y * 8 // 19) * 8 + x * 8 // 26 == bit
                assert mask[y, x] == cls and (mask[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2] == cls).all()
                checked += 1
    assert checked > 100
    # a cell without a core pixel of the class (as a rescale can leave it): any pixel of it, else the cell's centre
    thin = np.zeros((16, 16), np.uint8)
    thin[2, 2] = 1
    assert data.class_centre(thin, 1, np.int64(1 << 9), [0, 0]).numpy().tolist() == [2, 2]
    assert data.class_centre(thin, 2, np.int64(1 << 9), [0, 0]).numpy().tolist() == [3, 3]


# 12 records of 16x16: class 0 in all; class 1 in records 0-5, class 2 in 6-7, class 3 in 11 only.
HOLDERS = {0: range(12), 1: range(6), 2: (6, 7), 3: (11,)}


def frequency_masks():
    masks = [np.zeros((16, 16), np.uint8) for _ in range(12)]
    for cls, records in HOLDERS.items():
        for record in records:
            if cls:
                masks[record][5:11, 5:11] = cls
    return masks


@pytest.fixture(scope="module")
def frequency_dir(tmp_path_factory):
    return write_records(tmp_path_factory.mktemp("freq"), frequency_masks(), num_classes=4, num_shards=3)


def record_numbers(dataset, batches):
    """The record each example came from (its image's pixel value), over `batches` batches."""
    numbers = []
    for images, _ in dataset.take(batches):
        numbers.extend(np.round(images.numpy()[:, 0, 0, 0] * 255).astype(int).tolist())
    return np.array(numbers)


def expected_record_shares(share):
    """P x (a class uniform among the 4, then a record holding it) + (1 - P) x uniform over the 12."""
    shares = np.full(12, (1 - share) / 12)
    for records in HOLDERS.values():
        for record in records:
            shares[record] += share / len(HOLDERS) / len(records)
    return shares


@pytest.mark.parametrize("share", [0.5, 0.0])
def test_record_and_class_frequencies_are_the_mixture(frequency_dir, share):
    draws = 3000
    ds = data.build_dataset(frequency_dir, "train", training=True, repeat=True, batch_size=100, image_size=(16, 16),
                            shuffle_seed=3, cache="memory", class_uniform=share)
    numbers = record_numbers(ds, draws // 100)
    expected = expected_record_shares(share)
    counts = np.bincount(numbers, minlength=12)

    def within_binomial_error(count, probability):
        return abs(count - draws * probability) <= 4.5 * np.sqrt(draws * probability * (1 - probability))

    for record in range(12):
        assert within_binomial_error(counts[record], expected[record]), (record, counts, draws * expected)
    for cls, records in HOLDERS.items():  # the examples holding each class
        assert within_binomial_error(counts[list(records)].sum(), expected[list(records)].sum()), (cls, counts)
    if share == 0.0:  # natural draws: each pass is a permutation of the split
        for start in range(0, 120, 12):
            assert sorted(numbers[start:start + 12]) == list(range(12))
    else:  # the rarest class's only record: (1-P)/12 + P/4 x (1/12 + 1) = 0.177 of the draws, against 1/12
        assert counts[11] > draws * 0.15


def test_drawn_classes_are_uniform_and_the_plan_matches_the_stream(frequency_dir):
    index = tfrecord.load_class_index(frequency_dir, "train")
    plan = data.ClassUniformPlan(index, 0.3, seed=5)
    records, classes = plan.first(4000)
    draws = len(classes)
    for cls in range(4):
        share = np.mean(classes == cls)
        assert abs(share - 0.3 / 4) <= 4.5 * np.sqrt(0.3 / 4 * (1 - 0.3 / 4) / draws), (cls, share)
        assert set(records[classes == cls]) <= set(HOLDERS[cls])
    assert abs(np.mean(classes == -1) - 0.7) <= 4.5 * np.sqrt(0.21 / draws)
    natural, none = data.ClassUniformPlan(index, 0.0, seed=5).first(36)  # each pass a permutation of its own
    assert (none == -1).all() and all(sorted(natural[i:i + 12]) == list(range(12)) for i in (0, 12, 24))
    assert not np.array_equal(natural[:12], natural[12:24])
    ds = data.build_dataset(frequency_dir, "train", training=True, repeat=True, batch_size=50, image_size=(16, 16),
                            shuffle_seed=5, class_uniform=0.3)
    np.testing.assert_array_equal(record_numbers(ds, 4), records[:200])


# 40 records of 32x32, ignored but for one 6x6 object of one class: class 1 in 30 of them, class 2 in
# 8, class 3 in 2. Each record holds one class, so the record shown says which class was drawn.
OBJECT_CLASSES = [1] * 30 + [2] * 8 + [3] * 2


@pytest.fixture(scope="module")
def objects_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    masks = []
    for cls in OBJECT_CLASSES:
        mask = np.full((32, 32), IGNORE, np.uint8)
        y, x = rng.integers(0, 27, size=2)
        mask[y:y + 6, x:x + 6] = cls
        masks.append(mask)
    return write_records(tmp_path_factory.mktemp("objects"), masks, num_classes=4, num_shards=2)


@pytest.mark.parametrize("mode", ["crop", "scale_crop"])
def test_crops_hold_the_drawn_class(objects_dir, mode):
    sizing = dict(base_scale=(32, 32), ratio_range=(0.5, 2.0)) if mode == "scale_crop" else {}
    ds = data.build_dataset(objects_dir, "train", training=True, repeat=True, batch_size=60, image_size=(8, 8),
                            resize_mode=mode, shuffle_seed=1, cache="memory", class_uniform=1.0, **sizing)
    shown, held = [], []
    for images, masks in ds.take(5):
        for image, mask in zip(images.numpy(), masks.numpy()):
            if (mask != IGNORE).any():
                number = int(np.round(image[mask != IGNORE][0, 0] * 255))
            else:
                number = None
            shown.append(number)
            held.append(sorted(set(mask[mask != IGNORE].tolist())))
    # every crop shows the object of its record (one class a record, so it is the class drawn)
    assert None not in shown
    assert all(classes == [OBJECT_CLASSES[number]] for number, classes in zip(shown, held))
    # the classes uniform, though class 3 is in 2 records of 40 (binomial bound over 300 draws)
    drawn = np.bincount([OBJECT_CLASSES[n] for n in shown], minlength=4)[1:]
    assert np.all(np.abs(drawn - 100) <= 4.5 * np.sqrt(300 * (1 / 3) * (2 / 3))), drawn
    if mode == "crop":  # the same stream without class draws misses the object in most 8x8 crops of 32x32
        natural = data.build_dataset(objects_dir, "train", training=True, repeat=True, batch_size=60,
                                     image_size=(8, 8), resize_mode=mode, shuffle_seed=1, class_uniform=0.0)
        labelled = [(mask != IGNORE).any() for _, masks in natural.take(2) for mask in masks.numpy()]
        assert np.mean(labelled) < 0.6


def first_batches(directory, count, **options):
    settings = dict(training=True, repeat=True, batch_size=8, image_size=(8, 8), resize_mode="crop",
                    shuffle_seed=7, class_uniform=0.5)
    settings.update(options)
    return [(images.numpy(), masks.numpy()) for images, masks in
            data.build_dataset(directory, "train", **settings).take(count)]


def test_same_seed_same_stream_other_seed_other_stream_and_exact_resume(objects_dir):
    first = first_batches(objects_dir, 12)
    again = first_batches(objects_dir, 12)
    cached = first_batches(objects_dir, 12, cache="memory")  # examples from the memory cache, not read one by one
    other = first_batches(objects_dir, 12, shuffle_seed=8)
    resumed = first_batches(objects_dir, 4, start_example=8 * 8)
    for (images, masks), (images2, masks2), (images3, masks3) in zip(first, again, cached):
        np.testing.assert_array_equal(images, images2)
        np.testing.assert_array_equal(masks, masks2)
        np.testing.assert_array_equal(images, images3)
        np.testing.assert_array_equal(masks, masks3)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, other))
    for (images, masks), (images2, masks2) in zip(first[8:], resumed):
        np.testing.assert_array_equal(images, images2)
        np.testing.assert_array_equal(masks, masks2)


def test_pipelines_share_the_records_between_them(objects_dir):
    index = tfrecord.load_class_index(objects_dir, "train")
    for pipelines in (2, 3):  # 2 shards: whole shards for 2 pipelines, every third record for 3
        shares = [data.ClassUniformPlan(index, 0.5, 0, pipeline, pipelines).records for pipeline in range(pipelines)]
        assert sorted(np.concatenate(shares).tolist()) == list(range(40))
        assert max(len(s) for s in shares) - min(len(s) for s in shares) <= (20 if pipelines == 2 else 1)
    assert data.ClassUniformPlan(index, 0.5, 0, 0, 2).records.tolist() == list(range(20))


def test_each_input_pipeline_reads_its_own_share_from_the_cache_as_from_the_shards(tmp_path):
    """Shards of 2, 1 and 1 records on 2 pipelines (every other record: the second's are in the first
    and the last shard) and 3 (a shard each): each pipeline shows only its share, the same examples
    from the memory cache as read one by one."""
    masks = [np.where(np.arange(256).reshape(16, 16) % 16 < 8, number, IGNORE).astype(np.uint8)
             for number in range(4)]
    directory = write_records(tmp_path / "d", masks, num_classes=4, num_shards=3)
    index = tfrecord.load_class_index(directory, "train")
    assert index.shard_records.tolist() == [2, 1, 1]
    import tensorflow as tf

    for pipelines in (2, 3):
        for pipeline in range(pipelines):
            context = tf.distribute.InputContext(num_input_pipelines=pipelines, input_pipeline_id=pipeline,
                                                 num_replicas_in_sync=pipelines)
            share = data.ClassUniformPlan(index, 0.5, 0, pipeline, pipelines).records
            expected = [[0, 2], [1, 3]][pipeline] if pipelines == 2 else [[0, 1], [2], [3]][pipeline]
            assert share.tolist() == expected
            shown = {}
            for cache in ("memory", None):
                ds = data.build_dataset(directory, "train", training=True, repeat=True, batch_size=pipelines * 10,
                                        image_size=(16, 16), shuffle_seed=2, cache=cache, class_uniform=0.5,
                                        input_context=context)
                shown[cache] = record_numbers(ds, 3)
            np.testing.assert_array_equal(shown["memory"], shown[None])
            assert set(shown[None].tolist()) == set(expected)


# --------------------------------------------------------------------------- refusals


def test_data_without_the_index_is_refused_in_one_line(tmp_path):
    old = write_records(tmp_path / "old", frequency_masks(), num_classes=4, index=False)
    with pytest.raises(tfrecord.DatasetFormatError) as caught:
        data.build_dataset(old, "train", training=True, repeat=True, batch_size=2, image_size=(16, 16),
                           class_uniform=0.5)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{old}: split 'train' has no class index")
    assert f"python tools/make_tfrecords.py index --data {old}" in message
    args = train_cli.build_parser().parse_args(["--data", old, "--class-uniform", "0.5", "--iters", "1"])
    with pytest.raises(ConfigError, match="^--class-uniform: .* has no class index") as caught:
        train_cli.resolve_config(args)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("flags,message", [
    (["--class-uniform", "1.5"], "--class-uniform must be a share in [0, 1], got 1.5"),
    (["--class-uniform", "0.5"], "--class-uniform needs --data DIR"),
    (["--class-uniform", "0.5", "--cache", "/tmp/somewhere/cs"], "--class-uniform reads examples by their place"),
])
def test_bad_class_uniform_settings_are_one_line_errors(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--output", str(tmp_path / "r"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def indexed_tiny_data(tmp_path_factory):
    """8 demo scenes at 64x128 as train and (the same shards) as val, with their class index."""
    directory = write_tiny_data(str(tmp_path_factory.mktemp("tiny") / "data"))
    add_class_index(directory, log=lambda _: None)
    return directory


def tiny_config(directory, output, *extra):
    args = train_cli.build_parser().parse_args(
        ["--preset", "unet_small", "--data", directory, "--output", str(output), "--no-progress",
         "--image-size", "64x128", "--model-arg", "depth=3", "--model-arg", "base_filters=8", "--batch-size", "4",
         "--val-batch-size", "4", "--precision", "float32", "--strategy", "one", "--cache", "memory", "--seed", "1",
         "--iters", "12", "--val-every", "12", "--checkpoint-every", "2", "--steps-per-call", "2", "--warmup-iters",
         "2", "--schedule", "linear", "--no-export", *extra])
    config = train_cli.resolve_config(args)
    config.output, config.provenance = str(output), {"command": "test"}
    return config


@pytest.mark.slow  # four tiny trainer runs
def test_the_trainer_draws_class_uniformly_and_resumes_exactly(indexed_tiny_data, tmp_path):
    """--class-uniform changes the batches a run trains on (its weights differ from the run without it),
    and a run interrupted at step 6 and resumed ends with the weights of the uninterrupted one."""
    keras.mixed_precision.set_dtype_policy("float32")
    whole = Trainer(tiny_config(indexed_tiny_data, tmp_path / "whole", "--class-uniform", "0.5"), log=lambda _: None)
    whole.run()
    natural = Trainer(tiny_config(indexed_tiny_data, tmp_path / "natural"), log=lambda _: None)
    natural.run()
    assert not all(np.allclose(a, b) for a, b in zip(whole.model.get_weights(), natural.model.get_weights())), \
        "the trainer did not pass --class-uniform to its training stream (keras_seg/training/setup.py)"
    run = tmp_path / "stopped"
    trainer = Trainer(tiny_config(indexed_tiny_data, run, "--class-uniform", "0.5"), log=lambda _: None)
    checkpoint = trainer.checkpoint

    def stop_after_step_6(step):
        checkpoint(step)
        if step == 6:
            raise KeyboardInterrupt

    trainer.checkpoint = stop_after_step_6
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    args = train_cli.build_parser().parse_args(["--output", str(run), "--resume", "--no-progress"])
    resumed = Trainer(train_cli.resumed_config(str(run), args, []), log=lambda _: None)
    resumed.run()
    for a, b in zip(whole.model.get_weights(), resumed.model.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
