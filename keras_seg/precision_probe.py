"""Moved to keras_seg.training.precision_probe (transition shim, removed once every caller is updated)."""
from keras_seg.training.precision_probe import *  # noqa: F401,F403
