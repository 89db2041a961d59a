"""A run's val batch (setup.describe_run): whole images at their own size, so a split of several
sizes goes one image per replica. The planner counts val batches in it, and a budget run's partial
validations (and the final scoring of the same images) take it as their images per batch."""

import pytest

from keras_seg.training import setup
from test_train import make_config


def info_with_val_sizes(sizes):
    split = {"num_examples": 10, "shards": [], "image_sizes": {f"{h}x{w}": 5 for h, w in sizes}}
    return {"num_classes": 19, "class_names": [f"c{i}" for i in range(19)],
            "splits": {"train": dict(split, num_examples=100), "val": split}}


@pytest.mark.parametrize("sizes, replicas, expected", [
    ([(64, 128)], 1, 4),             # --val-batch-size 4
    ([(64, 128)], 2, 8),             # 4 per replica
    ([(64, 128), (48, 96)], 1, 1),   # several sizes: one image per replica
    ([(64, 128), (48, 96)], 2, 2),
])
def test_the_val_batch_is_per_replica_images_times_replicas(tmp_path, sizes, replicas, expected):
    config = make_config(str(tmp_path / "data"), tmp_path / "run")  # --val-batch-size 4
    shape = setup.describe_run(config, replicas, info=info_with_val_sizes(sizes))
    assert shape.val_batch == expected
    # 10 val images: the planner's count of val batches for a whole validation
    assert -(-shape.val_examples // shape.val_batch) == {4: 3, 8: 2, 1: 10, 2: 5}[expected]
