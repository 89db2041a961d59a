"""A model trained over several replicas is saved without synchronized batch norm (issue 20, item 14)."""

import json
import zipfile

import keras
import numpy as np

from keras_seg.models import presets
from keras_seg.run_dir import save_model_atomically


def test_synchronized_batch_norm_is_not_saved_and_training_keeps_it(tmp_path):
    model = presets.build_model({"model": {"architecture": "unet", "depth": 2, "base_filters": 4},
                                 "input_size": (32, 32)}, 3)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms
    for layer in norms:
        layer.synchronized = True  # as the trainer sets them with several replicas
    path = tmp_path / "best.keras"
    save_model_atomically(model, str(path))
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    saved = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("class_name") == "BatchNormalization":
                saved.append(node["config"].get("synchronized"))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    assert len(saved) == len(norms) and not any(saved), saved
    assert all(layer.synchronized for layer in norms)  # the training model keeps syncing
    loaded = keras.saving.load_model(path, compile=False)
    for a, b in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
