"""The TFRecord contract: example encoding, the sharded writer, dataset_info.json."""

import json
import os

import cv2
import numpy as np
import pytest
import tensorflow as tf

from keras_seg import tfrecord


def _example(seed, size=(6, 9)):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    mask = rng.choice([0, 4, 255], size=size).astype(np.uint8)
    image_png = cv2.imencode(".png", image[:, :, ::-1])[1].tobytes()
    mask_png = cv2.imencode(".png", mask)[1].tobytes()
    return image, mask, image_png, mask_png


def test_round_trip_bytes_and_arrays():
    image, mask, image_png, mask_png = _example(0)
    record = tfrecord.encode_example(image_png, "png", mask_png, 6, 9, "dir/a.png")
    decoded = tfrecord.decode_example(record)
    assert decoded[tfrecord.IMAGE_ENCODED] == image_png
    assert decoded[tfrecord.MASK_ENCODED] == mask_png
    assert decoded[tfrecord.IMAGE_FILENAME] == b"dir/a.png"
    sizes = (decoded[tfrecord.IMAGE_HEIGHT], decoded[tfrecord.IMAGE_WIDTH], decoded[tfrecord.IMAGE_CHANNELS])
    assert sizes == (6, 9, 3)
    assert decoded[tfrecord.IMAGE_FORMAT] == b"png" and decoded[tfrecord.MASK_FORMAT] == b"png"
    got_image, got_mask, name = tfrecord.decode_arrays(record)
    np.testing.assert_array_equal(got_image, image)
    np.testing.assert_array_equal(got_mask, mask)
    # the same record parsed by TensorFlow with the documented feature spec
    parsed = tf.io.parse_single_example(record, tfrecord.feature_spec())
    np.testing.assert_array_equal(tf.io.decode_png(parsed[tfrecord.MASK_ENCODED])[..., 0].numpy(), mask)
    np.testing.assert_array_equal(tf.io.decode_image(parsed[tfrecord.IMAGE_ENCODED]).numpy(), image)


def _tf_example(image_bytes, image_format, mask_png, height, width, filename, channels=3):
    """The reference: the same example built with TensorFlow's own protobuf classes."""

    def _bytes(value):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def _int(value):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    feature = {
        "image/encoded": _bytes(image_bytes), "image/filename": _bytes(filename.encode("utf-8")),
        "image/format": _bytes(image_format.encode()), "image/height": _int(height), "image/width": _int(width),
        "image/channels": _int(channels), "image/segmentation/class/encoded": _bytes(mask_png),
        "image/segmentation/class/format": _bytes(b"png"),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


@pytest.mark.parametrize("image_bytes, height, width, filename, channels", [
    (b"", 0, 0, "", 3),                                   # empty values, zero ints
    (b"\xff" * 127, 127, 128, "a.png", 1),                # lengths and ints at the 1/2-byte varint edge
    (bytes(range(256)) * 700, 2**31, 2**40, "städte/köln 1.jpg", 3),  # 179 kB, 3-byte length, UTF-8 name
    (b"x", -1, -(2**63), "n", 3),                         # negative int64: 10-byte varints
])
def test_encode_example_is_byte_identical_to_tensorflow(image_bytes, height, width, filename, channels):
    mask_png = b"\x89PNG" + bytes(300)
    ours = tfrecord.encode_example(image_bytes, "jpeg", mask_png, height, width, filename, channels)
    assert ours == _tf_example(image_bytes, "jpeg", mask_png, height, width, filename, channels)


def test_record_file_is_byte_identical_to_tensorflow_writer(tmp_path):
    records = [b"", b"a", bytes(range(256)) * 300, _example(3)[2]]
    with tfrecord.RecordFileWriter(str(tmp_path / "ours.tfrecord")) as writer:
        for record in records:
            writer.write(record)
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as writer:
        for record in records:
            writer.write(record)
    assert (tmp_path / "ours.tfrecord").read_bytes() == (tmp_path / "tf.tfrecord").read_bytes()
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / "ours.tfrecord"))] == records


def test_record_without_the_keys_is_rejected():
    foreign = tf.train.Example(features=tf.train.Features(feature={
        "image_raw": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x"]))})).SerializeToString()
    with pytest.raises(tfrecord.DatasetFormatError, match="lacks the keys"):
        tfrecord.decode_example(foreign)


def _write(directory, records, **kwargs):
    writer = tfrecord.ShardedWriter(str(directory), "train", num_examples=len(records), **kwargs)
    for position, record in enumerate(records):
        writer.write(record, position)
    writer.close()
    return writer.commit()


def test_writer_rolls_shards_by_size_in_order(tmp_path):
    records = [bytes([i]) * 100 for i in range(10)]
    names = _write(tmp_path, records, shard_bytes=350)  # 3 records of 100 bytes per shard
    assert names == [f"train-0000{i}-of-00004.tfrecord" for i in range(4)]
    read = [tfrecord.read_records(str(tmp_path / n)) for n in names]
    assert [len(r) for r in read] == [3, 3, 3, 1]
    assert sum(read, []) == records
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".partial")]


def test_writer_fixed_shard_count_uses_contiguous_blocks(tmp_path):
    records = [bytes([i]) for i in range(7)]
    names = _write(tmp_path, records, num_shards=3)
    # record i goes to shard i * 3 // 7: [0,1,2], [3,4], [5,6]
    assert [len(tfrecord.read_records(str(tmp_path / n))) for n in names] == [3, 2, 2]


def test_writer_abort_removes_everything(tmp_path):
    writer = tfrecord.ShardedWriter(str(tmp_path), "val", num_examples=4, num_shards=2)
    writer.write(b"a", 0)
    writer.write(b"b", 3)
    writer.abort()
    assert os.listdir(tmp_path) == []


def test_dataset_info_errors_name_the_problem(tmp_path):
    with pytest.raises(tfrecord.DatasetFormatError, match="no such directory"):
        tfrecord.load_dataset_info(str(tmp_path / "missing"))
    with pytest.raises(tfrecord.DatasetFormatError, match="no dataset_info.json"):
        tfrecord.load_dataset_info(str(tmp_path))
    (tmp_path / "dataset_info.json").write_text("{not json")
    with pytest.raises(tfrecord.DatasetFormatError, match="unreadable"):
        tfrecord.load_dataset_info(str(tmp_path))


def test_dataset_info_merge_and_clash(tmp_path):
    common = {"label_space": "voc", "num_classes": 21, "class_names": ["a"] * 21, "ignore_index": 255}
    info = tfrecord.merged_dataset_info(None, common, {"train": {"num_examples": 2}})
    info = tfrecord.merged_dataset_info(info, common, {"val": {"num_examples": 1}})
    assert set(info["splits"]) == {"train", "val"}
    tfrecord.write_dataset_info(str(tmp_path), info)
    assert json.loads((tmp_path / "dataset_info.json").read_text()) == info
    with pytest.raises(tfrecord.DatasetFormatError, match="num_classes"):
        tfrecord.merged_dataset_info(info, {**common, "num_classes": 19}, {})
