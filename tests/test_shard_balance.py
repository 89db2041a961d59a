"""Shards that do not divide among the input pipelines (3 shards, 2 pipelines) are shared record by record,
so every pipeline draws from every record alike: each record once per pass across the pipelines."""

import numpy as np
import tensorflow as tf
from test_data import _key, write_dataset

from keras_seg import data

PIPELINES = 2


def _context(pipeline):
    return tf.distribute.InputContext(num_input_pipelines=PIPELINES, input_pipeline_id=pipeline,
                                      num_replicas_in_sync=PIPELINES)


def test_three_shards_two_pipelines_read_every_record_once_per_pass(tmp_path):
    # 12 records in 3 shards of 4; each pipeline takes its half (6) of each pass, as the trainer's equal steps do.
    arrays = write_dataset(tmp_path, {"train": [(16, 16, "png")] * 12}, num_shards=3)
    expected = sorted(_key(image.astype(np.float32) / 255.0) for image, _ in arrays["train"])
    for epoch in range(2):
        seen = []
        for pipeline in range(PIPELINES):
            ds = data.build_dataset(tmp_path, "train", training=True, repeat=True, batch_size=4, image_size=(16, 16),
                                    shuffle_seed=5, input_context=_context(pipeline), start_example=6 * epoch)
            seen += [_key(image) for batch in ds.take(3) for image in batch[0].numpy()]
        assert sorted(seen) == expected, f"pass {epoch}: {len(set(seen))} distinct of 12"


def test_three_shards_two_pipelines_evaluate_halves(tmp_path):
    """One pass (evaluation): the pipelines' records are disjoint, complete and equal in number."""
    arrays = write_dataset(tmp_path, {"val": [(16, 16, "png")] * 12}, num_shards=3)
    expected = sorted(_key(image.astype(np.float32) / 255.0) for image, _ in arrays["val"])
    per_pipeline = []
    for pipeline in range(PIPELINES):
        ds = data.build_dataset(tmp_path, "val", training=False, batch_size=2, image_size=(16, 16),
                                input_context=_context(pipeline))
        per_pipeline.append([_key(image) for batch in ds for image in batch[0].numpy()])
    assert [len(keys) for keys in per_pipeline] == [6, 6]
    assert sorted(per_pipeline[0] + per_pipeline[1]) == expected
