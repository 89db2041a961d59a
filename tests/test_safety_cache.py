"""The file cache: claiming a prefix touches only its own files (issue 31 item 3)."""

import os

import tensorflow as tf

from keras_seg import data


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
