"""Training recipes: full-resolution settings, as plain data, that apply to any model preset.

A preset says what the model is; a recipe says how the data set's users train it at full
resolution. `python -m keras_seg.train --preset P --recipe R --data DIR` applies, in order: the
defaults, the preset's "train" entry, the recipe, the command line. The recipes follow
MMSegmentation's configs for these data sets (`configs/_base_/datasets/cityscapes.py`,
`pascal_voc12_aug.py`, `schedules/schedule_80k.py`): a random rescale of the whole image by 0.5-2.0
of a base scale, aspect kept, then a random crop (`--resize-mode scale_crop`, docs/data.md), flips
and photometric distortion; SGD 0.01 with momentum 0.9 and weight decay 5e-4 in the gradient (as
PyTorch applies it), poly decay (power 0.9, to 1e-4), for a global batch of 8 (scaled to the actual batch).

The on-device rotation is off and its scale gives way to the reader's, as in those configs.
"""

from __future__ import annotations

import copy

# MMSegmentation's PhotoMetricDistortion: brightness +-32/255, contrast (a plain multiplication) and
# saturation 0.5-1.5, hue +-18 in OpenCV's 0-180 hue, i.e. +-36 degrees, each with probability 0.5;
# flips with probability 0.5. One difference is left: MMSeg puts contrast after saturation and hue
# in half of the samples (its `mode`), here always before.
PHOTOMETRIC = {"flip_prob": 0.5, "scale_prob": 0.0, "rotation_prob": 0.0,
               "brightness_prob": 0.5, "brightness_delta": 32 / 255,
               "contrast_prob": 0.5, "contrast_range": (0.5, 1.5), "contrast_centre": "zero",
               "saturation_prob": 0.5, "saturation_range": (0.5, 1.5),
               "hue_prob": 0.5, "hue_delta": 18 / 180}

# Weight decay as PyTorch's SGD applies it (wd * w added to the gradient, then the momentum): at
# momentum 0.9 it shrinks weights by lr * wd / (1 - 0.9) a step, 10x Keras' decoupled lr * wd.
# MMSegmentation's schedule_80k / 40k have no paramwise_cfg: every parameter decays, biases and
# norms included, and so here.
SGD_POLY = {"optimizer": "sgd", "learning_rate": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
            "weight_decay_mode": "l2", "schedule": "poly", "poly_power": 0.9, "final_lr_ratio": 0.01,
            "warmup_iters": 0, "clipnorm": 0.0, "scale_lr_to_batch": 8, "loss": "ce", "patience": 0}

# The real-time models' own configs (MMSegmentation): LR-ASPP's
# `lraspp_m-v3-d8_4xb4-320k_cityscapes-512x1024` (batch 16 of 512x1024 crops, 320k iterations, SGD 0.01,
# CE) and DDRNet's `ddrnet_23-slim_in1k-pre_2xb6-120k_cityscapes-1024x1024` (batch 12 of 1024x1024 crops,
# 120k iterations, poly to 0) with OHEM cross-entropy (threshold 0.9, at least 131,072 pixels kept,
# the `ohem` loss's defaults) and OCNet's Cityscapes class weights, on both heads (aux 0.4).
# MMSegmentation selects the hard pixels on each GPU's 6 images; here on each replica's batch.
CITYSCAPES_OCNET_WEIGHTS = [0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023, 0.9539,
                            0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507]
LRASPP_CITYSCAPES = {**SGD_POLY, "image_size": (512, 1024), "resize_mode": "scale_crop", "base_scale": (1024, 2048),
                     "ratio_range": (0.5, 2.0), "cat_max_ratio": 0.75, "inference_mode": "whole", "iters": 320000,
                     "val_every": 16000, "batch_size": 16, "scale_lr_to_batch": 16, "val_batch_size": 1,
                     "augment": PHOTOMETRIC}
DDRNET_CITYSCAPES = {**SGD_POLY, "image_size": (1024, 1024), "resize_mode": "scale_crop", "base_scale": (1024, 2048),
                     "ratio_range": (0.5, 2.0), "cat_max_ratio": 0.75, "inference_mode": "whole", "iters": 120000,
                     "val_every": 12000, "batch_size": 12, "scale_lr_to_batch": 12, "final_lr_ratio": 0.0,
                     "val_batch_size": 1, "augment": PHOTOMETRIC, "loss": "ohem",
                     "class_weights": CITYSCAPES_OCNET_WEIGHTS}

RECIPES = {
    "lraspp_cityscapes": {
        "description": "LR-ASPP on Cityscapes (MMSegmentation's 320k config): batch 16 of 512x1024 crops of the "
                       "frame rescaled by 0.5-2.0, SGD 0.01 poly, cross-entropy",
        "train": LRASPP_CITYSCAPES,
    },
    "ddrnet_cityscapes": {
        "description": "DDRNet on Cityscapes (MMSegmentation's 120k config): batch 12 of 1024x1024 crops of the "
                       "frame rescaled by 0.5-2.0, SGD 0.01 poly to 0, OHEM cross-entropy with class weights",
        "train": DDRNET_CITYSCAPES,
    },
    "cityscapes_fullres": {
        "description": "Cityscapes at 2048x1024: 512x1024 crops of the frame rescaled by 0.5-2.0, 80k iterations, "
                       "whole-frame inference at 1024x2048 (MMSegmentation's 512x1024 80k schedule)",
        "train": {**SGD_POLY, "image_size": (512, 1024), "resize_mode": "scale_crop", "base_scale": (1024, 2048),
                  "ratio_range": (0.5, 2.0), "cat_max_ratio": 0.75, "inference_mode": "whole", "iters": 80000,
                  "val_every": 8000, "batch_size": 2, "val_batch_size": 1, "augment": PHOTOMETRIC},
    },
    "voc_fullres": {
        "description": "PASCAL VOC (each image its own size, ~500x375): 512x512 crops of the image rescaled by "
                       "0.5-2.0 of 512x2048, 40k iterations, sliding 512x512 windows at inference",
        "train": {**SGD_POLY, "image_size": (512, 512), "resize_mode": "scale_crop", "base_scale": (512, 2048),
                  "ratio_range": (0.5, 2.0), "cat_max_ratio": 0.75, "inference_mode": "slide", "iters": 40000,
                  "val_every": 4000, "batch_size": 4, "val_batch_size": 1, "augment": PHOTOMETRIC},
    },
}


def get_recipe(name: str) -> dict:
    """A copy of recipe `name`'s training settings."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    return copy.deepcopy(RECIPES[name]["train"])
