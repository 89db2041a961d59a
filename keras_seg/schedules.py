"""Moved to keras_seg.training.schedules (transition shim, removed once every caller is updated)."""
from keras_seg.training.schedules import *  # noqa: F401,F403
