"""Segmentation models: one builder function per architecture, and named presets."""

from keras_seg.models.fcn import build_fcn
from keras_seg.models.presets import PRESETS, build_model, get_preset, list_presets
from keras_seg.models.unet import build_unet

__all__ = ["PRESETS", "build_fcn", "build_model", "build_unet", "get_preset", "list_presets"]
