"""The keras-seg TFRecord format: the one contract between conversion and training.

A dataset directory holds sharded TFRecord files and a `dataset_info.json`:

    {split}-{i:05d}-of-{n:05d}.tfrecord     e.g. train-00000-of-00004.tfrecord
    dataset_info.json                       label space, classes, per-split shards and statistics

Each record is a `tf.train.Example` with the feature keys of TF Model Garden / DeepLab's
`build_data.py`:

    image/encoded                       bytes   the image file, JPEG or PNG, 3 channels, 8-bit
    image/filename                      bytes   where the image came from, relative to the source root
    image/format                        bytes   b"jpeg" or b"png"
    image/height                        int64   image height in pixels
    image/width                         int64   image width in pixels
    image/channels                      int64   3
    image/segmentation/class/encoded    bytes   the mask: a 1-channel 8-bit PNG of class indices,
                                                0..num_classes-1, and 255 (ignore) elsewhere
    image/segmentation/class/format     bytes   b"png"

The mask always has the image's height and width. `dataset_info.json` (written by
`write_dataset_info`) records, for the whole directory: `format_version`, `source`,
`label_space`, `num_classes`, `class_names`, `class_colors`, `ignore_index` (255); and under
`splits.{name}`: `num_examples`, `shards` (file names), `class_pixel_counts` (one per class),
`ignored_pixels`, `image_sizes` ({"HxW": count}), `image_formats` ({"png": count}), `skipped`,
`class_index` (the file name below) and `class_record_counts` (records holding each class).

Beside each split's shards, its class index (`write_class_index`; what class-uniform sampling reads):

    {split}-class-index.npz     numpy arrays, one row per record in the split's order (the shards
                                sorted by name, each read from its start):
        cells           uint64 [N, num_classes]  bit g*r + c set when grid cell (r, c) of the record's
                                                 mask holds a core pixel of the class, one whose 3x3
                                                 neighbourhood (inside the mask) is all of the class
                                                 (0: the class is absent); row y of an H-row mask is
                                                 in grid row y * g // H, column x of a W-column one
                                                 in grid column x * g // W
        grid            int64 []                 g, the grid's side (CLASS_INDEX_GRID, 8)
        shards          str [S]                  the shard file names
        shard_records   int64 [S]                records in each shard
        shard_bytes     int64 [S]                each shard's size in bytes (a stale index is refused)
        offsets         int64 [N]                byte offset of the record's frame in its shard
        lengths         int64 [N]                the record's length in bytes (without its frame)
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct
import tempfile

import google_crc32c
import numpy as np

from keras_seg.files import publish, temp_path_beside, write_json_atomically

FORMAT_VERSION = 1
DATASET_INFO_NAME = "dataset_info.json"
CLASS_INDEX_GRID = 8  # cells per side of the class index's grid (64 cells: one uint64 of bits per class)
DEFAULT_SHARD_BYTES = 32 * 1024 * 1024

IMAGE_ENCODED = "image/encoded"
IMAGE_FILENAME = "image/filename"
IMAGE_FORMAT = "image/format"
IMAGE_HEIGHT = "image/height"
IMAGE_WIDTH = "image/width"
IMAGE_CHANNELS = "image/channels"
MASK_ENCODED = "image/segmentation/class/encoded"
MASK_FORMAT = "image/segmentation/class/format"

BYTES_KEYS = (IMAGE_ENCODED, IMAGE_FILENAME, IMAGE_FORMAT, MASK_ENCODED, MASK_FORMAT)
INT_KEYS = (IMAGE_HEIGHT, IMAGE_WIDTH, IMAGE_CHANNELS)
ALL_KEYS = BYTES_KEYS + INT_KEYS

_SHARD_RE = re.compile(r"^(?P<split>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.tfrecord$")


class DatasetFormatError(ValueError):
    """A dataset directory or record that does not follow this format."""


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def existing_shards(directory: str, split: str) -> list:
    """Shard files of `split` present in `directory` (sorted file names)."""
    names = [os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(directory), f"{split}-*.tfrecord"))]
    return sorted(n for n in names if (m := _SHARD_RE.match(n)) and m["split"] == split)


# --------------------------------------------------------------------------- examples


def encode_example(
    image_bytes: bytes,
    image_format: str,
    mask_png: bytes,
    height: int,
    width: int,
    filename: str = "",
    channels: int = 3,
) -> bytes:
    """One serialized `tf.train.Example` in the format above.

    The bytes are those of `tf.train.Example(...).SerializeToString(deterministic=True)` (the tests
    compare them), written without TensorFlow: the converter's processes never pay its import.
    """
    if image_format not in ("jpeg", "png"):
        raise ValueError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
    features = {
        IMAGE_ENCODED: image_bytes,
        IMAGE_FILENAME: filename.encode("utf-8"),
        IMAGE_FORMAT: image_format.encode("ascii"),
        IMAGE_HEIGHT: int(height),
        IMAGE_WIDTH: int(width),
        IMAGE_CHANNELS: int(channels),
        MASK_ENCODED: mask_png,
        MASK_FORMAT: b"png",
    }
    entries = []
    # Deterministic serialization writes map entries in key order: same example, same bytes.
    for key in sorted(features, key=lambda k: k.encode("utf-8")):
        value = features[key]
        if isinstance(value, int):
            feature = _message_field(3, _message_field(1, _varint(value)))  # int64_list { value (packed) }
        else:
            feature = _message_field(1, _message_field(1, bytes(value)))  # bytes_list { value }
        entries.append(_message_field(1, _message_field(1, key.encode("utf-8")) + _message_field(2, feature)))
    return _message_field(1, b"".join(entries))  # Example { features { feature: map<string, Feature> } }


# The protobuf wire format, as much of it as tf.train.Example needs: every field here is
# length-delimited (wire type 2), and the only numbers are packed int64 values (varints).
def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # a negative int64 is its 64-bit two's complement, 10 bytes long
    out = bytearray()
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


def _message_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def decode_example(serialized: bytes) -> dict:
    """A serialized example -> dict of Python values (bytes / int), checking every key is there."""
    import tensorflow as tf

    example = tf.train.Example.FromString(serialized)
    feature = example.features.feature
    missing = [k for k in ALL_KEYS if k not in feature]
    if missing:
        raise DatasetFormatError(f"record lacks the keys {missing}: not a keras-seg / DeepLab segmentation record")
    out = {k: feature[k].bytes_list.value[0] for k in BYTES_KEYS}
    out.update({k: int(feature[k].int64_list.value[0]) for k in INT_KEYS})
    return out


def decode_arrays(serialized: bytes):
    """A serialized example -> (image uint8 [H, W, 3] RGB, mask uint8 [H, W], filename)."""
    import cv2

    record = decode_example(serialized)
    image = cv2.imdecode(np.frombuffer(record[IMAGE_ENCODED], np.uint8), cv2.IMREAD_COLOR)
    mask = cv2.imdecode(np.frombuffer(record[MASK_ENCODED], np.uint8), cv2.IMREAD_UNCHANGED)
    return image[:, :, ::-1].copy(), mask, record[IMAGE_FILENAME].decode("utf-8")


def feature_spec() -> dict:
    """`tf.io.parse_example` spec of the format (all keys required)."""
    import tensorflow as tf

    spec = {k: tf.io.FixedLenFeature([], tf.string) for k in BYTES_KEYS}
    spec.update({k: tf.io.FixedLenFeature([], tf.int64) for k in INT_KEYS})
    return spec


def read_records(path: str):
    """Serialized records of one TFRecord file, in order (numpy side, for tools and tests)."""
    import tensorflow as tf

    return [r.numpy() for r in tf.data.TFRecordDataset(path)]


def find_damage(path: str):
    """What is wrong with the first damaged record of a TFRecord file, naming the byte offset of its
    frame, or None when every frame is whole and its CRCs match. Reads the whole file: for use after
    a read has failed."""
    for _, record in _frames(path):
        if isinstance(record, str):
            return record
    return None


def read_frames(path: str):
    """(byte offset of the frame, record) for each record of a TFRecord file, in order, its CRCs
    checked, without TensorFlow. Raises DatasetFormatError naming the file and the damage."""
    for offset, record in _frames(path):
        if isinstance(record, str):
            raise DatasetFormatError(f"{path}: {record}")
        yield offset, record


def _frames(path: str):
    """(offset, record) per whole frame; a damaged one gives (offset, what is wrong, a str) and ends the walk."""
    with open(path, "rb") as f:
        offset = 0
        while True:
            header = f.read(12)  # length (uint64 LE) and its masked CRC-32C
            if not header:
                return
            if len(header) < 12:
                yield offset, f"truncated record header at byte {offset} ({len(header)} of 12 bytes)"
                return
            if _masked_crc32c(header[:8]) != header[8:]:
                yield offset, f"corrupt record length at byte {offset} (CRC mismatch)"
                return
            (length,) = struct.unpack("<Q", header[:8])
            body = f.read(length + 4)
            if len(body) < length + 4:
                missing, framed = length + 4 - len(body), length + FRAME_OVERHEAD
                yield offset, f"truncated record at byte {offset} ({missing} of its {framed} bytes missing)"
                return
            if _masked_crc32c(body[:length]) != body[length:]:
                yield offset, f"corrupt record at byte {offset} (CRC mismatch)"
                return
            yield offset, body[:length]
            offset += length + FRAME_OVERHEAD


# --------------------------------------------------------------------------- writing


def _masked_crc32c(data: bytes) -> bytes:
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


FRAME_OVERHEAD = 16  # bytes a TFRecord frame adds to its record: length, and two CRCs


def frame_record(record: bytes) -> bytes:
    """One record as a TFRecord file stores it: length (uint64 LE), masked CRC-32C of the length,
    the record, masked CRC-32C of the record (the layout of TensorFlow's `RecordWriter`)."""
    length = struct.pack("<Q", len(record))
    return b"".join((length, _masked_crc32c(length), record, _masked_crc32c(record)))


class RecordFileWriter:
    """Writes one TFRecord file, byte for byte as `tf.io.TFRecordWriter` (no compression) does,
    without importing TensorFlow."""

    def __init__(self, path: str):
        self._file = open(path, "wb")

    def write(self, record: bytes):
        self._file.write(frame_record(record))

    def write_framed(self, framed: bytes):
        """Write a record already framed by `frame_record`."""
        self._file.write(framed)

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ShardedWriter:
    """Writes one split's records into shards under temporary names; `commit` gives them their names.

    Records are written in the order given. With `num_shards`, record `position` of `num_examples`
    goes to shard `position * num_shards // num_examples` (contiguous blocks); without, a new shard
    starts when the current one would pass `shard_bytes`. Either way the output depends only on
    the sequence of records, so it is the same whatever produced them.
    """

    def __init__(self, directory, split, *, num_examples, num_shards=None, shard_bytes=DEFAULT_SHARD_BYTES):
        self.directory, self.split = directory, split
        self.num_examples = num_examples
        self.num_shards = None if num_shards is None else max(1, min(num_shards, num_examples))
        self.shard_bytes = shard_bytes
        self._temp_paths = []
        self._writer = None
        self._current_bytes = 0
        self._current_offset = 0
        self.bytes_written = 0
        # (shard number, byte offset of its frame, record length) of each record written, in order
        self.locations = []

    def _open_next(self):
        if self._writer is not None:
            self._writer.close()
        fd, path = tempfile.mkstemp(prefix=f".{self.split}-{len(self._temp_paths):05d}.", suffix=".partial",
                                    dir=self.directory)
        os.close(fd)
        self._temp_paths.append(path)
        self._writer = RecordFileWriter(path)
        self._current_bytes = 0
        self._current_offset = 0

    def write(self, record: bytes, position: int):
        self.write_framed(frame_record(record), position)

    def write_framed(self, framed: bytes, position: int):
        """Write a record already framed by `frame_record` (the converter's workers frame their own)."""
        size = len(framed) - FRAME_OVERHEAD  # shard sizes count records, as `write` does
        if self.num_shards is not None:
            target = position * self.num_shards // self.num_examples
            while len(self._temp_paths) <= target:
                self._open_next()
        elif self._writer is None or (self._current_bytes and self._current_bytes + size > self.shard_bytes):
            self._open_next()
        self._writer.write_framed(framed)
        self.locations.append((len(self._temp_paths) - 1, self._current_offset, size))
        self._current_bytes += size
        self._current_offset += len(framed)
        self.bytes_written += size

    def close(self):
        """Finish writing (empty trailing shards are created when num_shards asks for them)."""
        if self.num_shards is not None:
            while len(self._temp_paths) < self.num_shards:
                self._open_next()
        elif self._writer is None:
            self._open_next()  # an empty split still gets one (empty) shard
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def names(self) -> list:
        """The shards' final names (`commit` gives them)."""
        count = len(self._temp_paths)
        return [shard_name(self.split, i, count) for i in range(count)]

    def commit(self) -> list:
        """Rename the finished shards to their final names; returns the names."""
        names = self.names()
        for path, name in zip(self._temp_paths, names):
            publish(path, os.path.join(self.directory, name))
        self._temp_paths = []
        return names

    def abort(self):
        """Remove everything written so far."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for path in self._temp_paths:
            if os.path.exists(path):
                os.remove(path)
        self._temp_paths = []


# --------------------------------------------------------------------------- class index


def class_index_name(split: str) -> str:
    return f"{split}-class-index.npz"


def class_cells(mask: np.ndarray, grid: int = CLASS_INDEX_GRID) -> np.ndarray:
    """For each of the 256 mask values, the grid cells of `mask` holding a core pixel of it, as bits
    of a uint64 (bit grid * row + column; the module docstring defines the cells). uint64 [256]; 0: absent.

    A core pixel is one whose 3x3 neighbourhood (the part inside the mask) holds its value only: the
    stray pixels that JPEG noise gives a colour-coded mask (the Cityscapes pairs: 'train' in 1,300
    of 2,677 records, 2 pixels in half of them, against 105 records with a core pixel) and 1-pixel
    fringes at borders are not presence.
    """
    import cv2

    height, width = mask.shape
    mask = np.ascontiguousarray(mask, np.uint8)
    neighbourhood = np.ones((3, 3), np.uint8)
    # Erosion and dilation ignore what lies outside the mask (OpenCV's default border for them).
    core = cv2.erode(mask, neighbourhood) == cv2.dilate(mask, neighbourhood)
    rows = (np.arange(height) * grid // height).astype(np.int32)
    cols = (np.arange(width) * grid // width).astype(np.int32)
    cell = (rows[:, None] * grid + cols[None, :]) * 256 + mask
    held = np.bincount(cell[core], minlength=grid * grid * 256).reshape(grid * grid, 256) > 0
    bits = np.left_shift(np.uint64(1), np.arange(grid * grid, dtype=np.uint64))
    return np.bitwise_or.reduce(np.where(held, bits[:, None], np.uint64(0)), axis=0)


def class_index_summary(split: str, cells: np.ndarray) -> dict:
    """What dataset_info.json records of a split's class index: its file and the records holding each class."""
    return {"class_index": class_index_name(split), "class_record_counts": [int(n) for n in (cells != 0).sum(axis=0)]}


def write_class_index(directory: str, split: str, cells: np.ndarray, locations, shards: list):
    """Write `{split}-class-index.npz` for the split's shards (already under their names in `directory`).

    cells: uint64 [N, num_classes], one row per record in the split's order; locations: (shard
    number, frame offset, record length) per record, in the same order (`ShardedWriter.locations`).
    """
    locations = np.asarray(locations, np.int64).reshape(-1, 3)
    if len(locations) != len(cells):
        raise ValueError(f"{len(cells)} rows of cells for {len(locations)} records")
    arrays = {
        "cells": np.asarray(cells, np.uint64),
        "grid": np.int64(CLASS_INDEX_GRID),
        "shards": np.asarray(shards, dtype=str),
        "shard_records": np.bincount(locations[:, 0], minlength=len(shards)).astype(np.int64),
        "shard_bytes": np.asarray([os.path.getsize(os.path.join(directory, n)) for n in shards], np.int64),
        "offsets": locations[:, 1],
        "lengths": locations[:, 2],
    }
    path = os.path.join(directory, class_index_name(split))
    tmp = temp_path_beside(path)
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class ClassIndex:
    """A split's class index, read and checked against its shards (`load_class_index`)."""

    def __init__(self, directory, arrays):
        self.directory = directory
        self.cells = arrays["cells"]  # uint64 [N, num_classes]
        self.grid = int(arrays["grid"])
        self.shards = [str(n) for n in arrays["shards"]]
        self.shard_records = arrays["shard_records"]
        self.offsets, self.lengths = arrays["offsets"], arrays["lengths"]

    @property
    def num_records(self) -> int:
        return len(self.cells)

    def record_shards(self) -> np.ndarray:
        """The shard number of each record."""
        return np.repeat(np.arange(len(self.shards)), self.shard_records)


def load_class_index(directory: str, split: str, info: dict | None = None) -> ClassIndex:
    """The split's class index; DatasetFormatError (one line, saying how to add one) when it is
    missing, unreadable, or does not describe the shards on disk."""
    info = load_dataset_info(directory) if info is None else info
    name = (info["splits"].get(split) or {}).get("class_index") or class_index_name(split)
    path = os.path.join(directory, name)
    remedy = (f"add one with `python tools/make_tfrecords.py index --data {directory}` (or convert the dataset "
              "again with tools/make_tfrecords.py)")
    if not os.path.exists(path):
        raise DatasetFormatError(f"{directory}: split '{split}' has no class index ({name}), which class-uniform "
                                 f"sampling needs: {remedy}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in ("cells", "grid", "shards", "shard_records", "shard_bytes",
                                                 "offsets", "lengths")}
    except (OSError, ValueError, KeyError, EOFError) as err:
        raise DatasetFormatError(f"{path}: unreadable class index ({err}): {remedy}") from err
    listed = sorted((info["splits"].get(split) or {}).get("shards") or existing_shards(directory, split))
    sizes = [os.path.getsize(os.path.join(directory, n)) if os.path.exists(os.path.join(directory, n)) else -1
             for n in listed]
    if [str(n) for n in arrays["shards"]] != listed or arrays["shard_bytes"].tolist() != sizes:
        raise DatasetFormatError(f"{path}: the class index describes other shards than split '{split}' has now "
                                 f"(converted, copied or damaged since it was written): {remedy}")
    index = ClassIndex(directory, arrays)
    if index.cells.ndim != 2 or index.cells.shape[1] != int(info["num_classes"]) or \
            int(index.shard_records.sum()) != index.num_records:
        raise DatasetFormatError(f"{path}: class index of the wrong shape {index.cells.shape} for "
                                 f"{info['num_classes']} classes: {remedy}")
    return index


# --------------------------------------------------------------------------- dataset_info.json


def load_dataset_info(directory: str) -> dict:
    """Read `dataset_info.json`, with a clear error when the directory is not a converted dataset."""
    path = os.path.join(directory, DATASET_INFO_NAME)
    if not os.path.isdir(directory):
        raise DatasetFormatError(f"{directory}: no such directory")
    if not os.path.exists(path):
        raise DatasetFormatError(
            f"{directory}: no {DATASET_INFO_NAME}: not a dataset written by tools/make_tfrecords.py"
        )
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetFormatError(f"{path}: unreadable ({err})") from err
    for key in ("num_classes", "ignore_index", "splits"):
        if key not in info:
            raise DatasetFormatError(f"{path}: lacks '{key}'")
    return info


def write_dataset_info(directory: str, info: dict):
    """Write `dataset_info.json` atomically (temporary file, then rename)."""
    write_json_atomically(os.path.join(directory, DATASET_INFO_NAME), info)


_COMMON_KEYS = ("label_space", "num_classes", "class_names", "ignore_index")


def merged_dataset_info(existing: dict | None, common: dict, splits: dict) -> dict:
    """`existing` info updated with new `splits`; refuses to mix label spaces in one directory."""
    if existing is None:
        info = {"format_version": FORMAT_VERSION, **common, "splits": {}}
    else:
        for key in _COMMON_KEYS:
            if existing.get(key) != common.get(key):
                raise DatasetFormatError(
                    f"the output directory holds a dataset with {key}={existing.get(key)!r}, "
                    f"this conversion has {key}={common.get(key)!r}: use another --output"
                )
        info = dict(existing)
    info["splits"] = {**info.get("splits", {}), **splits}
    return info


VALIDATION_SPLITS = ("val", "validation")  # ours, and TensorFlow Datasets' name


def has_one_image_size(info: dict, split: str) -> bool:
    """Whether every image of `split` has the same size (then whole images batch without padding)."""
    return len(info["splits"][split].get("image_sizes") or {}) == 1


def validation_split(info: dict):
    """The name of a directory's validation split: "val", else TFDS' "validation"; None when it has neither."""
    return next((name for name in VALIDATION_SPLITS if name in info["splits"]), None)
