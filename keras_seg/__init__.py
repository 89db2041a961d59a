"""keras-seg: semantic segmentation with Keras 3 and TensorFlow.

The flow: raw data -> `pipelines/` (tools/make_tfrecords.py) -> TFRecords (`keras_seg.tfrecord`)
-> `keras_seg.data` -> model -> metrics -> export.

Public names are resolved lazily (PEP 562), so `import keras_seg` and the command-line tools start
without importing TensorFlow until a name that needs it is used.
"""

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "IGNORE_INDEX": "keras_seg.labels",
    "LabelSpace": "keras_seg.labels",
    "cityscapes_label_space": "keras_seg.labels",
    "voc_label_space": "keras_seg.labels",
    "load_dataset_info": "keras_seg.tfrecord",
    "encode_example": "keras_seg.tfrecord",
    "decode_example": "keras_seg.tfrecord",
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
