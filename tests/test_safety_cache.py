"""The file cache: claiming a prefix touches only its own files (issue 31 item 3); a damaged cache file is
named, with the advice to delete it (item 10)."""

import os

import numpy as np
import pytest
import tensorflow as tf

from keras_seg import data, demo


def test_claiming_a_prefix_leaves_a_longer_prefixs_live_files(tmp_path):
    short, longer = str(tmp_path / "cs"), str(tmp_path / "cs-fullres")
    # Another run, alive, filling its cache under "cs-fullres": TensorFlow's own lock and partial files.
    other = data._cache_path(longer, "train", (64, 128), "resize", True, 0, 1)
    live = iter(tf.data.Dataset.range(64).map(lambda x: tf.fill([256], x)).cache(other))
    first = [int(next(live)[0]) for _ in range(8)]
    live_files = sorted(os.listdir(tmp_path))
    assert any(n.endswith(".lockfile") for n in live_files) and any(".tempstate" in n for n in live_files)
    # What a run killed under "cs" left: the same TensorFlow names on this prefix's file names.
    mine = os.path.basename(data._cache_path(short, "val", (64, 128), "resize", False, 0, 1))
    stale = [n.replace(os.path.basename(other), mine) for n in live_files]
    complete = [f"{os.path.basename(data._cache_path(short, 'train', None, 'resize', True, 0, 1))}{suffix}"
                for suffix in (".index", ".data-00000-of-00001")]  # a finished cache: kept
    users = ["cs-notes.lockfile", "cs-old.tempstate"]  # not names this run writes
    for name in stale + complete + users:
        (tmp_path / name).write_bytes(b"x")

    removed = []
    lock = data.claim_file_cache(short, log=removed.append)
    try:
        assert removed == [f"removed {tmp_path / n}, left by an interrupted run" for n in sorted(stale)]
        assert sorted(os.listdir(tmp_path)) == sorted(live_files + complete + users + ["cs.keras_seg.lock"])
        # The other run reads on and completes its cache.
        assert first + [int(x[0]) for x in live] == list(range(64))
        assert os.path.exists(other + ".index")
    finally:
        lock.close()


def _read_all(data_dir, prefix):
    dataset = data.build_dataset(data_dir, "val", training=False, batch_size=1, image_size=(32, 64), cache=prefix)
    return [masks.numpy() for _, masks in dataset]


def test_a_damaged_cache_file_is_named_with_the_advice_to_delete_it(tmp_path):
    """Re-reading a damaged cache (as --resume would) meets the same damage: the message names the
    cache's files and says to delete them; deleted, the cache is filled again from the intact shards."""
    data_dir = demo.write_demo_dataset(str(tmp_path / "data"), splits={"val": 3}, size=(32, 64), log=lambda _: None)
    prefix = str(tmp_path / "cache" / "cs")
    os.makedirs(os.path.dirname(prefix))
    first = _read_all(data_dir, prefix)  # fills the cache
    cache = data._cache_path(prefix, "val", (32, 64), "resize", False, 0, 1)
    files = [cache + ".data-00000-of-00001", cache + ".index"]
    assert all(os.path.exists(f) for f in files)
    with open(files[0], "r+b") as f:
        f.seek(os.path.getsize(files[0]) // 2)
        f.write(b"\xff" * 64)
    with pytest.raises(tf.errors.DataLossError) as damage:
        _read_all(data_dir, prefix)
    with pytest.raises(tf.errors.DataLossError):
        _read_all(data_dir, prefix)  # what --resume would read again
    line = data.damaged_data(data_dir, ["val"], damage.value, prefix)
    assert "\n" not in line and line.startswith(f"{files[0]}, {files[1]}: a damaged --cache file (")
    assert "delete them" in line and "resume" not in line
    for path in files:
        os.remove(path)
    assert all(np.array_equal(a, b) for a, b in zip(first, _read_all(data_dir, prefix)))


def test_the_shards_are_still_scanned_when_no_cache_file_is_named(tmp_path):
    data_dir = demo.write_demo_dataset(str(tmp_path / "data"), splits={"val": 2}, size=(32, 64), log=lambda _: None)
    prefix = str(tmp_path / "cs")
    _read_all(data_dir, prefix)
    error = tf.errors.InternalError(None, None, "Read less bytes than requested")  # a truncated cache file
    line = data.damaged_data(data_dir, ["val"], error, prefix)
    cache = data._cache_path(prefix, "val", (32, 64), "resize", False, 0, 1)
    assert line == (f"reading {data_dir}: Read less bytes than requested; its shards read whole, so the damage is "
                    f"likely in the --cache {prefix} files: delete {cache}.data-00000-of-00001, {cache}.index (the "
                    "next run fills the cache again)")
    shard = os.path.join(data_dir, sorted(f for f in os.listdir(data_dir) if f.startswith("val-"))[0])
    with open(shard, "r+b") as f:
        f.seek(20)
        f.write(b"\x00" * 8)
    assert data.damaged_data(data_dir, ["val"], error, prefix).startswith(f"{shard}: ")
