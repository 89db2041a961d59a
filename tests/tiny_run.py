"""A minimal training run directory for the inference tests: config.json, dataset_info.json and the
best.keras of a tiny untrained UNet, written in a moment instead of trained. Its config.json records the
inference contract as training does (`keras_seg.config.validate`): stretched whole images, padded to a
multiple of the model's stride."""

import json
import os

import keras

from keras_seg import contract
from keras_seg.config import model_stride
from keras_seg.labels import cityscapes_label_space
from keras_seg.models.presets import build_model, recorded_model_config

INPUT_SIZE = (64, 128)
MODEL = {"architecture": "unet", "depth": 3, "base_filters": 8, "activation": "silu", "batch_norm": True,
         "upsampling": "transpose"}


def write_run(directory, precision="float32", seed=3, model=MODEL, preset="unet_small"):
    """Writes the run (its model built under the dtype policy `precision`); returns its path."""
    os.makedirs(directory, exist_ok=True)
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(precision)
    try:
        keras.utils.set_random_seed(seed)
        # Built as a run recorded with this config is rebuilt (defaults of older runs filled in).
        model_entry = {"model": recorded_model_config(model), "input_size": INPUT_SIZE}
        build_model(model_entry, 19).save(os.path.join(directory, "best.keras"))
    finally:
        keras.mixed_precision.set_dtype_policy(previous)
    recorded = contract.for_training("resize", list(INPUT_SIZE), size_divisor=model_stride(model))
    config = {"preset": preset, "model": model, "image_size": list(INPUT_SIZE), "resize_mode": "resize",
              "inference": recorded.to_dict(), "resolved": {"precision": precision}}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(directory, "dataset_info.json"), "w") as f:
        json.dump({"source": "demo", **cityscapes_label_space("trainid").to_json()}, f)
    return str(directory)
