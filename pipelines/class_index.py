"""Adds the class index (`{split}-class-index.npz`, see keras_seg/tfrecord.py) to a dataset directory
converted before the converter wrote one, reading its shards instead of the source dataset.

    python tools/make_tfrecords.py index --data DIR [--split NAME ...]

The index it writes is the one the converter writes for the same records (tests/test_class_uniform.py).
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from keras_seg import tfrecord


def index_split(directory: str, split: str, info: dict):
    """(cells uint64 [N, num_classes], locations [(shard number, offset, length)], shard names) of a split."""
    shards = sorted(info["splits"][split].get("shards") or tfrecord.existing_shards(directory, split))
    num_classes = int(info["num_classes"])
    cells, locations = [], []
    for number, name in enumerate(shards):
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise tfrecord.DatasetFormatError(f"{path}: listed in {tfrecord.DATASET_INFO_NAME} but missing")
        for offset, record in tfrecord.read_frames(path):
            try:
                encoded = tfrecord.decode_example(record)[tfrecord.MASK_ENCODED]
            except tfrecord.DatasetFormatError as err:
                raise tfrecord.DatasetFormatError(f"{path}: record at byte {offset}: {err}") from err
            mask = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED)
            if mask is None or mask.ndim != 2:
                raise tfrecord.DatasetFormatError(f"{path}: record at byte {offset}: its mask is not a 1-channel PNG")
            cells.append(tfrecord.class_cells(mask)[:num_classes])
            locations.append((number, offset, len(record)))
    return np.asarray(cells, np.uint64).reshape(-1, num_classes), locations, shards


def add_class_index(directory: str, splits=None, log=print) -> dict:
    """Write the class index of `splits` (default: every split) and record it in dataset_info.json.

    Raises DatasetFormatError (one line) for a directory that is not a converted dataset, an
    unknown split, or a damaged shard; nothing is written then.
    """
    info = tfrecord.load_dataset_info(directory)
    wanted = list(splits) if splits else sorted(info["splits"])
    unknown = [s for s in wanted if s not in info["splits"]]
    if unknown:
        raise tfrecord.DatasetFormatError(f"{directory}: no split {', '.join(map(repr, unknown))} (it has "
                                          f"{sorted(info['splits'])})")
    indexed = {split: index_split(directory, split, info) for split in wanted}  # every split read before writing
    for split, (cells, locations, shards) in indexed.items():
        tfrecord.write_class_index(directory, split, cells, locations, shards)
        info["splits"][split].update(tfrecord.class_index_summary(split, cells))
        log(f"{split}: indexed {len(cells)} records -> {tfrecord.class_index_name(split)}")
    tfrecord.write_dataset_info(directory, info)
    return info
