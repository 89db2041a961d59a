"""Moved to keras_seg.training.trainer (transition shim, removed once every caller is updated)."""
from keras_seg.training.step import build_optimizer  # noqa: F401
from keras_seg.training.trainer import Trainer, keep_until_exit  # noqa: F401
