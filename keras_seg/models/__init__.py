"""Segmentation models: one builder function per architecture, ImageNet encoders, and named presets."""

from keras_seg.models.deeplab import build_deeplabv3plus
from keras_seg.models.encoder_unet import build_encoder_unet
from keras_seg.models.encoders import ENCODERS, EncoderWeightsError
from keras_seg.models.erfnet import build_erfnet
from keras_seg.models.fcn import build_fcn
from keras_seg.models.presets import PRESETS, build_model, get_preset, list_presets
from keras_seg.models.unet import build_unet

__all__ = ["ENCODERS", "EncoderWeightsError", "PRESETS", "build_deeplabv3plus", "build_encoder_unet", "build_erfnet",
           "build_fcn", "build_model", "build_unet", "get_preset", "list_presets"]
