"""keras-seg: semantic segmentation with Keras 3 and TensorFlow.

The flow: raw data -> `pipelines/` (tools/make_tfrecords.py) -> TFRecords (`keras_seg.tfrecord`)
-> `keras_seg.data` -> model -> metrics -> export.

Public names are resolved lazily (PEP 562), so `import keras_seg` and the command-line tools start
without importing TensorFlow until a name that needs it is used.
"""

import importlib
import os
import sys

__version__ = "0.1.0"

# TensorFlow's oneDNN kernels, on before TensorFlow is imported (the variable is read then). TF 2.21
# turns them on by itself only on CPUs with AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX; on an AVX2-only
# AMD Zen 3 the trainer's step took 1.9x as long without them (docs/performance.md). A value the
# user set wins; `keras_seg.distribute.onednn_state` says what the run got.
if "TF_ENABLE_ONEDNN_OPTS" in os.environ:
    ONEDNN_SOURCE = "environment"
elif "tensorflow" in sys.modules:
    ONEDNN_SOURCE = "tensorflow"  # imported first: it has read the variable already, unset
else:
    ONEDNN_SOURCE = "keras_seg"
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"

# public name -> module that defines it
_EXPORTS = {
    # labels and the data format
    "IGNORE_INDEX": "keras_seg.labels",
    "LabelSpace": "keras_seg.labels",
    "cityscapes_label_space": "keras_seg.labels",
    "voc_label_space": "keras_seg.labels",
    "load_dataset_info": "keras_seg.tfrecord",
    "encode_example": "keras_seg.tfrecord",
    "decode_example": "keras_seg.tfrecord",
    # input pipeline and augmentation
    "build_dataset": "keras_seg.data",
    "distribute_dataset": "keras_seg.data",
    "AugmentConfig": "keras_seg.augment",
    "SegmentationAugment": "keras_seg.augment",
    "augment_segmentation": "keras_seg.augment",
    # models
    "list_presets": "keras_seg.models.presets",
    "get_preset": "keras_seg.models.presets",
    "build_model": "keras_seg.models.presets",
    "build_unet": "keras_seg.models.unet",
    "build_fcn": "keras_seg.models.fcn",
    "build_encoder_unet": "keras_seg.models.encoder_unet",
    "build_deeplabv3plus": "keras_seg.models.deeplab",
    "ENCODERS": "keras_seg.models.encoders",
    "EncoderWeightsError": "keras_seg.models.encoders",
    # losses and metrics
    "CrossEntropyLoss": "keras_seg.losses",
    "DiceLoss": "keras_seg.losses",
    "FocalLoss": "keras_seg.losses",
    "CombinedLoss": "keras_seg.losses",
    "build_loss": "keras_seg.losses",
    "compute_class_weights": "keras_seg.losses",
    "MeanIoU": "keras_seg.metrics",
    "PixelAccuracy": "keras_seg.metrics",
    "MeanDice": "keras_seg.metrics",
    "summarize_confusion": "keras_seg.metrics",
    "PerClassMetricsLogger": "keras_seg.callbacks",
    # inference, evaluation, export
    "load_segmenter": "keras_seg.inference",
    "Segmenter": "keras_seg.segmenter",
    "InferenceContract": "keras_seg.contract",
    "contract_probabilities": "keras_seg.contract",
    "InferenceError": "keras_seg.segmenter",
    "evaluate_split": "keras_seg.scoring",
    "export_saved_model": "keras_seg.export",
    # pictures
    "colorize": "keras_seg.visualize",
    "overlay": "keras_seg.visualize",
    "confusion_matrix_image": "keras_seg.visualize",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'keras_seg' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
