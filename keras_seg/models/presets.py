"""Presets: named model configurations as plain data, and `build_model`, which builds one.

A preset entry is a dict:

    "description": str   what it is, in a line
    "model": dict        "architecture" (a key of ARCHITECTURES) and that builder's
                         keyword arguments; "unet" with an "encoder" is the UNet over an
                         ImageNet encoder (`build_encoder_unet`)
    "input_size": tuple  (height, width) of the training images

    "train": dict        training defaults (`keras_seg.train`): length (epochs, iters or
                         time_budget), batch size, loss, ...; keys left out take the defaults
                         of `keras_seg.config.TrainConfig`
    "demo": dict         overrides of "train" (and of "model" / "input_size" under "model" /
                         "image_size") when training on the built-in demo dataset (no --data)

`build_model` reads only "model" and "input_size". Parameter counts (19 classes,
3-channel input) are in docs/models.md.
"""

from __future__ import annotations

import copy
import inspect

from keras_seg.models.ddrnet import build_ddrnet
from keras_seg.models.deeplab import build_deeplabv3plus
from keras_seg.models.encoder_unet import build_encoder_unet
from keras_seg.models.erfnet import build_erfnet
from keras_seg.models.fcn import build_fcn
from keras_seg.models.lraspp import build_lraspp
from keras_seg.models.unet import build_unet
from keras_seg.recipes import DDRNET_CITYSCAPES, LRASPP_CITYSCAPES, SGD_POLY

ARCHITECTURES = {"unet": build_unet, "fcn": build_fcn, "deeplabv3plus": build_deeplabv3plus, "lraspp": build_lraspp,
                 "ddrnet": build_ddrnet, "erfnet": build_erfnet}
# Architectures whose builder takes `with_aux` (an auxiliary head for training, weight `aux_weight`).
AUX_ARCHITECTURES = ("deeplabv3plus", "ddrnet")
ENCODER_ARCHITECTURES = ("unet", "fcn", "deeplabv3plus")  # "unet" when it has an "encoder"

# The built-in demo (no --data) must end in minutes on any machine: a 6-minute time budget from
# process start, demo data writing included (the run sizes itself to the machine, docs/training.md),
# so that the default command ends within 8 minutes even on a slow or shared CPU. The UNet presets
# keep their architecture (levels, activation, norm, up-sampling) at a quarter of the width, on
# 64x128 inputs. On CPU-B in float32 it reached val mIoU 0.61 on 2 cores (docs/performance.md).
DEMO_BUDGET = 6
# Its validations may take 5% of it, half a budget run's default share: a 6-minute run spends 85% of its
# time after start-up in training steps even on a slow CPU (docs/performance.md, "The default command").
DEMO_RUN = {"time_budget": DEMO_BUDGET, "val_share": 0.05}
UNET_DEMO = {"model": {"base_filters": 16}, "image_size": (64, 128), **DEMO_RUN, "batch_size": 16,
             "learning_rate": 2e-3, "warmup_epochs": 0.5, "patience": 0, "cache": "memory"}

# Over ImageNet encoders: the demo trains from random weights (nothing downloads), with Adam.
ENCODER_DEMO = {"encoder_weights": None, "image_size": (64, 128), **DEMO_RUN, "batch_size": 16,
                "optimizer": "adamw", "learning_rate": 1e-3, "schedule": "cosine", "warmup_epochs": 0.5,
                "scale_lr_to_batch": 0, "weight_decay": 1e-4, "clipnorm": 1.0, "patience": 0, "cache": "memory"}

# unet_small's training on a CPU: a 35-minute time budget the trainer sizes to the machine at hand
# (docs/training.md). Chosen on the 2,975 Cityscapes pairs on 2 CPU cores: CE + Dice with ENet class
# weights brings the rare classes in; a short schedule learns faster with mild augmentation (scale
# 0.9-1.25, no rotation). Linear-to-zero: the best mean of linear, cosine and poly at a 10-minute
# budget, two seeds each, though within the seeds' spread (docs/performance.md). The real-time
# models' CPU presets train the same way, for a side-by-side comparison (docs/models.md).
# Class-uniform sampling (+1.4 points over two seeds), progressive resizing and Lovasz were measured on
# this budget (docs/performance.md, "Short-budget techniques") and stay flags: class-uniform needs a
# class index, which the demo and older conversions lack (a fallback first).
CPU_BUDGET = {"time_budget": 35, "schedule": "linear", "batch_size": 8, "learning_rate": 2e-3,
              "warmup_epochs": 0.5, "loss": "ce+dice", "class_weights": "enet", "cache": "memory", "patience": 0,
              "augment": {"scale_range": (0.9, 1.25), "rotation_prob": 0.0}}

PRESETS = {
    "unet_silu": {
        "description": "UNet, 4 levels, 64 -> 1024 filters, batch norm, SiLU, transposed-conv up-sampling (best seed)",
        "model": {
            "architecture": "unet",
            "depth": 4,
            "base_filters": 64,
            "activation": "silu",
            "batch_norm": True,
            "upsampling": "transpose",
        },
        "input_size": (256, 512),
        "train": {"epochs": 100, "batch_size": 8, "learning_rate": 1e-3, "loss": "ce"},
        "demo": UNET_DEMO,
    },
    "unet_relu": {
        "description": "the classic UNet: as unet_silu with ReLU",
        "model": {
            "architecture": "unet",
            "depth": 4,
            "base_filters": 64,
            "activation": "relu",
            "batch_norm": True,
            "upsampling": "transpose",
        },
        "input_size": (256, 512),
        "train": {"epochs": 100, "batch_size": 8, "learning_rate": 1e-3, "loss": "ce"},
        "demo": UNET_DEMO,
    },
    "unet_small": {
        # Chosen on 2 CPU cores (tools/bench_models.py, then 35-minute runs on the Cityscapes pairs,
        # README): the 1.9M-parameter, 5-level UNet it replaced, minus its full-resolution level.
        # A stride-2 stem and bilinear up-sampling of the logits stand in for that level, which held
        # the largest activations: 1.34x the training speed at the same parameter count.
        "description": "UNet for CPU training: stride-2 stem, 4 levels, 16 -> 256 filters, batch norm, ReLU, "
                       "128x256 input",
        "model": {
            "architecture": "unet",
            "depth": 4,
            "base_filters": 16,
            "activation": "relu",
            "batch_norm": True,
            "upsampling": "transpose",
            "stem_stride": 2,
        },
        "input_size": (128, 256),
        "train": CPU_BUDGET,
        "demo": {"image_size": (64, 128), **DEMO_RUN, "batch_size": 16, "patience": 0},
    },
    "fcn8s": {
        "description": "FCN-8s over VGG16 with the paper's 4096-filter fc6 (7x7) and fc7",
        "model": {"architecture": "fcn", "backbone": "vgg16", "head": "8s", "fc_filters": 4096, "fc_kernel": 7,
                  "preprocessing": "caffe"},
        "input_size": (256, 512),
        "train": {"epochs": 100, "batch_size": 8, "learning_rate": 1e-4, "loss": "ce"},
        "demo": {"model": {"fc_filters": 256, "fc_kernel": 1}, "image_size": (64, 128),
                 **DEMO_RUN, "batch_size": 16, "patience": 0, "cache": "memory"},
    },
    "fcn_resnet50": {
        "description": "FCN-8s over ResNet-50 with a 512-filter 3x3 fc6 and 1x1 fc7",
        "model": {"architecture": "fcn", "backbone": "resnet50", "head": "8s", "fc_filters": 512, "fc_kernel": 3,
                  "preprocessing": "caffe"},
        "input_size": (256, 512),
        "train": {"epochs": 100, "batch_size": 8, "learning_rate": 1e-4, "loss": "ce"},
        "demo": {"image_size": (64, 128), **DEMO_RUN, "batch_size": 16, "patience": 0,
                 "cache": "memory"},
    },
    # Over ImageNet encoders (keras_seg.models.encoders). They train from "imagenet" weights by
    # default: downloaded once into $KERAS_HOME/models, or --encoder-weights PATH / none. Their
    # demo (no --data) starts from random weights: nothing downloads for it.
    "deeplabv3plus_resnet50": {
        "description": "DeepLabV3+ over ResNet-50 at output stride 16 (dilated conv5), SMP's separable ASPP 6/12/18 "
                       "and decoder, auxiliary FCN head (loss weight 0.4); MMSegmentation's Cityscapes schedule "
                       "(--recipe cityscapes_fullres)",
        "model": {"architecture": "deeplabv3plus", "encoder": "resnet50", "output_stride": 16, "separable": True,
                  "aux_weight": 0.4},
        "input_size": (512, 1024),
        "train": {**SGD_POLY, "encoder_weights": "imagenet", "iters": 80000, "val_every": 8000, "batch_size": 2,
                  "val_batch_size": 1},
        "demo": ENCODER_DEMO,
    },
    "unet_resnet50": {
        "description": "UNet over ResNet-50: segmentation_models' decoder (256, 128, 64, 32, 16 filters)",
        "model": {"architecture": "unet", "encoder": "resnet50", "decoder_filters": (256, 128, 64, 32, 16)},
        "input_size": (256, 512),
        "train": {"encoder_weights": "imagenet", "epochs": 100, "batch_size": 8, "learning_rate": 1e-4,
                  "loss": "ce"},
        "demo": ENCODER_DEMO,
    },
    "unet_mobilenetv3": {
        "description": "UNet over MobileNetV3-Large for CPUs and edge devices: decoder 128, 64, 32, 16, 16 filters",
        # MobileNetV3's batch norms keep 99.9% of their statistics a step; at Keras' 0.99 a short
        # run from random weights validates with statistics that fit it (docs/performance.md).
        "model": {"architecture": "unet", "encoder": "mobilenetv3large", "decoder_filters": (128, 64, 32, 16, 16),
                  "encoder_bn_momentum": 0.99},
        "input_size": (256, 512),
        "train": {"encoder_weights": "imagenet", "epochs": 100, "batch_size": 8, "learning_rate": 1e-3,
                  "loss": "ce"},
        "demo": ENCODER_DEMO,
    },
    # Real-time models (issue 22; docs/models.md). Their "train" entries are for a GPU at full
    # resolution (MMSegmentation's configs, also as --recipe lraspp_cityscapes / ddrnet_cityscapes);
    # the CPU-budget entry (--time-budget) is to be chosen by the 35-minute runs still to be made.
    "lraspp_mobilenetv3_large": {
        "description": "LR-ASPP over MobileNetV3-Large, dilated last stage (output stride 16): 3.2M parameters",
        # Momentum 0.99 for the encoder's batch norms, as unet_mobilenetv3, for runs from random weights.
        "model": {"architecture": "lraspp", "encoder": "mobilenetv3large", "encoder_bn_momentum": 0.99},
        "input_size": (512, 1024),
        "train": {**LRASPP_CITYSCAPES, "encoder_weights": None},
        "demo": ENCODER_DEMO,
    },
    "lraspp_mobilenetv3_small": {
        "description": "LR-ASPP over MobileNetV3-Small, dilated last stage (output stride 16): 1.1M parameters",
        "model": {"architecture": "lraspp", "encoder": "mobilenetv3small", "encoder_bn_momentum": 0.99},
        "input_size": (512, 1024),
        "train": {**LRASPP_CITYSCAPES, "encoder_weights": None},
        "demo": ENCODER_DEMO,
    },
    "ddrnet23_slim": {
        "description": "DDRNet-23-slim from scratch: dual-resolution branches, DAPPM, auxiliary head (loss weight "
                       "0.4): 5.7M parameters",
        "model": {"architecture": "ddrnet", "aux_weight": 0.4},
        "input_size": (1024, 1024),
        "train": DDRNET_CITYSCAPES,
        "demo": {"image_size": (64, 128), **DEMO_RUN, "batch_size": 16, "patience": 0,
                 "cache": "memory"},
    },
    # The real-time models on a CPU budget: unet_small's training (CPU_BUDGET) at 256x512, where their
    # stride-8 outputs are 32x64 (at 128x256, DDRNet's low-resolution branch would be 2x4 pixels).
    "ddrnet23_slim_cpu": {
        "description": "DDRNet-23-slim from scratch on a 35-minute CPU budget at 256x512 (auxiliary head 0.4)",
        "model": {"architecture": "ddrnet", "aux_weight": 0.4},
        "input_size": (256, 512),
        "train": CPU_BUDGET,
        "demo": {"image_size": (64, 128), **DEMO_RUN, "batch_size": 16, "patience": 0},
    },
    "lraspp_mobilenetv3_small_cpu": {
        "description": "LR-ASPP over MobileNetV3-Small from scratch on a 35-minute CPU budget at 256x512",
        "model": {"architecture": "lraspp", "encoder": "mobilenetv3small", "encoder_bn_momentum": 0.99},
        "input_size": (256, 512),
        "train": {**CPU_BUDGET, "encoder_weights": None},
        "demo": ENCODER_DEMO,
    },
    # ERFNet (issue 32; docs/models.md). "train" is the authors' Cityscapes recipe (Eromera/erfnet_pytorch,
    # train/main.py): Adam 5e-4 with weight decay 1e-4 added to the gradients (PyTorch's Adam: "l2"), poly 0.9
    # to zero, 150 epochs of 6 whole frames resized to 512x1024, flips, cross-entropy with ENet's class
    # weights. Left out: their two stages (the encoder first, on labels at 1/8), the 0-2 pixel shifts, and
    # their weights' constant (fixed Cityscapes weights of 2.8-10.4: ENet's formula with c = 1.10, as their
    # values give; `enet` computes ENet's c = 1.02 on the run's own training split).
    "erfnet": {
        "description": "ERFNet from scratch: factorized (3x1, 1x3) residual blocks, dilations 2-16 at stride 8, "
                       "transposed-conv decoder: 2.06M parameters",
        "model": {"architecture": "erfnet"},
        "input_size": (512, 1024),
        "train": {"optimizer": "adam", "learning_rate": 5e-4, "weight_decay": 1e-4, "weight_decay_mode": "l2",
                  "schedule": "poly", "poly_power": 0.9, "final_lr_ratio": 0.0, "warmup_iters": 0, "clipnorm": 0.0,
                  "epochs": 150, "batch_size": 6, "loss": "ce", "class_weights": "enet", "patience": 0,
                  "augment": {"flip_prob": 0.5, "scale_prob": 0.0, "rotation_prob": 0.0, "brightness_prob": 0.0,
                              "contrast_prob": 0.0, "saturation_prob": 0.0, "hue_prob": 0.0}},
        "demo": {"image_size": (64, 128), **DEMO_RUN, "batch_size": 16, "patience": 0,
                 "cache": "memory"},
    },
    # At unet_small's 128x256, not the other real-time models' 256x512: ERFNet has 4.2x unet_small's
    # multiply-accumulates at the same size already (docs/models.md), 16.6x at 256x512. Its stride-8 maps are
    # 16x32 at 128x256: the dilation-16 blocks read mostly padding there.
    "erfnet_cpu": {
        "description": "ERFNet from scratch on a 35-minute CPU budget at 128x256 (unet_small's training)",
        "model": {"architecture": "erfnet"},
        "input_size": (128, 256),
        "train": CPU_BUDGET,
        "demo": {"image_size": (64, 128), **DEMO_RUN, "batch_size": 16, "patience": 0},
    },
}


def recorded_model_config(model: dict) -> dict:
    """A model config as a run recorded it, for rebuilding that run's model.

    FCN runs recorded before the `preprocessing` argument existed fed the encoder [0, 1] RGB
    images: they are rebuilt so ("none"), not with today's default ("caffe"). DeepLabV3+ runs
    recorded before the `separable` argument existed had the plain head (`separable=False`).
    """
    model = dict(model)
    if model.get("architecture") == "fcn":
        model.setdefault("preprocessing", "none")
    if model.get("architecture") == "deeplabv3plus":
        model.setdefault("separable", False)
    return model


def list_presets() -> list:
    """The preset names, in definition order."""
    return list(PRESETS)


def get_preset(name: str) -> dict:
    """A copy of preset `name`'s entry, safe to modify."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def build_model(preset, num_classes: int, input_size=None, channels: int = 3, encoder_weights=None,
                with_aux: bool = False):
    """Build the model of a preset.

    Args:
        preset: str or dict. A preset name, or a preset entry (a dict with "model" and
            "input_size", as `get_preset` returns, possibly modified).
        num_classes: int. Number of output classes (the dataset's `num_classes`).
        input_size: `(height, width)` or None. Overrides the preset's input size; `(None, None)`
            builds a model that accepts any size its architecture allows.
        channels: int. Input channels (3 for the ImageNet encoders).
        encoder_weights: None / "none" (random), "imagenet" (downloaded once into
            `$KERAS_HOME/models`), or a local `.weights.h5` / legacy `.h5` file of the preset's
            encoder; for the architectures with an ImageNet encoder.
        with_aux: bool. The training model: for a preset with an auxiliary head
            (`aux_weight` > 0), outputs `[logits, aux_logits]`.

    Returns:
        A `keras.Model` mapping images [B, H, W, channels] in [0, 1] to float32 logits
        [B, H, W, num_classes]. Models with an encoder list its layers in `encoder_layer_names`.

    Example:

    ```python
    model = build_model("deeplabv3plus_resnet50", num_classes=19, input_size=(512, 1024),
                        encoder_weights="imagenet")  # or a local file: "resnet50_..._notop.h5"
    ```
    """
    entry = get_preset(preset) if isinstance(preset, str) else copy.deepcopy(preset)
    if "model" not in entry:
        raise ValueError(f"a preset entry needs a 'model' dict; got keys {sorted(entry)}")
    model_args = dict(entry["model"])
    architecture = model_args.pop("architecture", None)
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    height, width = input_size if input_size is not None else entry.get("input_size", (None, None))
    builder = builder_for({"architecture": architecture, **model_args})
    has_encoder = encoder_of({"architecture": architecture, **model_args}) is not None
    if encoder_weights not in (None, "none"):
        if not has_encoder:
            raise ValueError(f"encoder weights {encoder_weights!r}: the {architecture} architecture without an "
                             "encoder has none to load (use a preset with an ImageNet encoder)")
    if has_encoder:
        model_args["encoder_weights"] = encoder_weights
    if architecture in AUX_ARCHITECTURES:
        model_args["with_aux"] = with_aux
    if isinstance(preset, str):
        model_args.setdefault("name", preset)
    return builder(num_classes=num_classes, input_shape=(height, width, channels), **model_args)


def builder_for(model_config: dict):
    """The builder function of a model config: "unet" with an "encoder" is `build_encoder_unet`."""
    architecture = model_config.get("architecture")
    if architecture == "unet" and "encoder" in model_config:
        return build_encoder_unet
    return ARCHITECTURES[architecture]


# Arguments `build_model` passes itself: not part of a model config.
BUILD_ARGUMENTS = ("num_classes", "input_shape", "encoder_weights", "with_aux")


def encoder_of(model_config: dict):
    """The encoder a model config builds on (a key of `encoders.ENCODERS`), or None: its builder's
    `encoder` (`backbone` for FCN) argument, as given or by the builder's default."""
    if model_config.get("architecture") not in ARCHITECTURES:
        return None
    builder = builder_for(model_config)
    argument = "backbone" if builder is build_fcn else "encoder"
    parameter = inspect.signature(builder).parameters.get(argument)
    return None if parameter is None else model_config.get(argument, parameter.default)


def aux_weight_of(model_config: dict) -> float:
    """The auxiliary head's loss weight (0: none)."""
    return float(model_config.get("aux_weight", 0.0)) if model_config.get("architecture") in AUX_ARCHITECTURES else 0.0
