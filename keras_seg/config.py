"""The resolved configuration of a training run: one typed object, validated before anything heavy.

`TrainConfig` is what the trainer reads and what `config.json` records (`to_dict`); a recorded
run comes back through `TrainConfig.from_dict`. Values come from, in order: the defaults below,
the preset's "train" entry, its "demo" entry (no --data), and the command line
(`keras_seg.train.resolve_config`). `validate` turns every bad value into one `ConfigError` line.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "poly", "linear", "plateau")
RESIZE_MODES = ("resize", "crop", "fit", "scale_crop")
INFERENCE_MODES = ("whole", "slide")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("auto", "one", "mirrored", "multiworker", "tpu")
CLASS_WEIGHT_METHODS = ("none", "inverse", "median", "enet")

# Keys of configs recorded by earlier versions, and what became of them.
RETIRED_KEYS = {
    "time_limit": "--time-limit was replaced by --time-budget MINUTES, which sizes the schedule to end in time",
    "max_steps": "--max-steps was replaced by --iters N",
}


class ConfigError(ValueError):
    """A bad configuration value, reported as one line before anything heavy starts."""


@dataclasses.dataclass
class TrainConfig:
    # --- model and data
    preset: str = "unet_silu"
    recipe: Optional[str] = None  # keras_seg.recipes: full-resolution training settings over the preset's
    model: dict = dataclasses.field(default_factory=dict)  # "architecture" + the builder's arguments
    image_size: list = dataclasses.field(default_factory=lambda: [256, 512])
    data: Optional[str] = None
    demo: bool = False
    resize_mode: str = "resize"
    base_scale: Optional[list] = None  # scale_crop: [H, W] the random ratios multiply (MMSeg's `scale`, as HxW)
    ratio_range: list = dataclasses.field(default_factory=lambda: [0.5, 2.0])  # scale_crop
    cat_max_ratio: float = 1.0  # scale_crop: < 1 retries crops dominated by one class (MMSeg's RandomCrop)
    class_uniform: float = 0.0  # share of training examples drawn class-uniformly (docs/data.md); 0: off
    inference_mode: Optional[str] = None  # scale_crop: "slide" (default) or "whole" at base_scale
    inference_overlap: float = 1 / 3
    inference: dict = dataclasses.field(default_factory=dict)  # the contract, derived (keras_seg.contract)
    # Progressive resizing: the first `progressive` share of the decay's progress (the warm-up included)
    # at `progressive_scale` x image_size (and x base_scale), then image_size to the end; 0: off.
    progressive: float = 0.0
    progressive_scale: float = 0.5
    cache: Optional[str] = None
    encoder_weights: Optional[str] = None  # None / "none", "imagenet", or a local .weights.h5 / legacy .h5 file
    # --- fine-tuning an ImageNet encoder (keras_seg.models.encoders)
    freeze_encoder: object = 0  # 0: off; N: the encoder's weights stay as loaded for the first N steps; "all": the run
    encoder_lr_mult: float = 1.0  # the encoder's updates scaled by this (its learning rate, in effect)
    freeze_encoder_bn: bool = False  # the encoder's batch norms in inference mode, their parameters fixed
    # --- length: exactly one of iters, epochs, time_budget is non-zero
    iters: int = 0
    epochs: int = 100
    time_budget: float = 0.0  # minutes, from process start to exit
    steps_per_epoch: int = 0  # 0: one pass over the training split (global batch x accumulate)
    val_every: int = 0  # steps; 0: every epoch (epochs), a tenth of the run (iters), spaced in time (time_budget)
    val_share: float = 0.1  # time_budget: the most of it that validations during the run may take
    checkpoint_every: int = 0  # steps; 0: with every validation
    steps_per_call: int = 10  # steps run in one call of the compiled loop
    # --- batch
    batch_size: int = 8  # per replica
    val_batch_size: int = 8
    accumulate: int = 1  # batches whose gradients make one optimizer step
    scale_lr_to_batch: int = 0  # the global batch `learning_rate` is meant for; 0: no scaling
    # --- optimizer and schedule
    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    weight_decay: float = 1e-4  # decoupled: not applied to biases and normalisation parameters
    weight_decay_mode: str = "decoupled"  # or "l2": PyTorch's SGD, wd * w in every gradient
    clipnorm: float = 1.0  # global gradient norm; 0: off
    schedule: str = "cosine"
    warmup_iters: Optional[int] = None  # takes precedence over warmup_epochs when set (0: no warm-up)
    warmup_epochs: float = 1.0
    final_lr_ratio: Optional[float] = None  # None: the shape's default (keras_seg.training.schedules)
    poly_power: float = 0.9
    plateau_patience: int = 3  # validations without improvement before the plateau cut
    plateau_factor: float = 0.5
    # --- objective
    loss: str = "ce"
    class_weights: object = "none"  # a method name or a list of weights
    augment: dict = dataclasses.field(default_factory=dict)
    # --- compute
    precision: str = "auto"
    jit: bool = False
    strategy: str = "auto"
    devices: int = 0  # mirrored: the first N GPUs, or N logical CPUs on a machine without GPUs; 0: all
    seed: int = 0
    patience: int = 15  # early stopping: validations without improvement; 0: off
    # --- this invocation
    output: Optional[str] = None
    resume: bool = False
    init_from: Optional[str] = None
    progress: bool = True
    export: bool = True
    provenance: dict = dataclasses.field(default_factory=dict)
    resolved: dict = dataclasses.field(default_factory=dict)  # what the trainer decided (precision, steps, ...)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> set:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> TrainConfig:
        """A config from a dict (a recorded config.json); unknown keys are a `ConfigError`."""
        values = dict(values)
        for key, why in RETIRED_KEYS.items():
            if values.pop(key, None):
                raise ConfigError(f"{source}: {why}; this run was recorded by an earlier keras-seg")
        unknown = sorted(set(values) - cls.field_names())
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        if "model" in values:
            from keras_seg.models.presets import recorded_model_config

            values["model"] = recorded_model_config(values["model"])
        return cls(**values)

    @property
    def length_mode(self) -> str:
        return "iters" if self.iters else "time_budget" if self.time_budget else "epochs"


def set_length(config: TrainConfig, iters=None, epochs=None, time_budget=None):
    """Set the run's length by one of the three; the others are cleared (the last word wins)."""
    given = {k: v for k, v in (("iters", iters), ("epochs", epochs), ("time_budget", time_budget)) if v is not None}
    if len(given) > 1:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ConfigError(f"choose one of --iters, --epochs, --time-budget (got {flags})")
    if given:
        config.iters, config.epochs, config.time_budget = 0, 0, 0.0
        (key, value), = given.items()
        setattr(config, key, value)


# The multiple every architecture's builder requires of the input's sides (its `check_input_size`),
# where it does not depend on the builder's arguments. tests/test_safety_strides.py holds every
# preset's entry to its builder's own check.
# "unet" is the U-Net over an ImageNet encoder; without one it needs 2**depth x stem_stride.
INPUT_MULTIPLES = {"unet": 32, "fcn": 32, "deeplabv3plus": 32, "lraspp": 32, "ddrnet": 64, "erfnet": 8}


def model_stride(model_config: dict) -> int:
    """The factor the input size must be divisible by: what the architecture's builder checks, so
    that a size it refuses is a one-line configuration error before the run directory exists."""
    architecture = model_config.get("architecture")
    if architecture == "unet" and "encoder" not in model_config:
        return 2 ** int(model_config.get("depth", 4)) * int(model_config.get("stem_stride", 1))
    return INPUT_MULTIPLES.get(architecture, 32)


def progressive_size(config, stride=None) -> list:
    """The training size of a progressive run's first phase: image_size x progressive_scale, each side
    rounded to the nearest multiple of the model's stride (at least one stride)."""
    stride = model_stride(config.model) if stride is None else stride
    return [max(stride, int(round(side * config.progressive_scale / stride)) * stride) for side in config.image_size]


def _check_progressive(config, stride):
    if not config.progressive:
        return
    if not 0 < config.progressive < 1:
        raise ConfigError(f"--progressive must be a share of the run in (0, 1), got {config.progressive}")
    if not 0 < config.progressive_scale < 1:
        raise ConfigError(f"--progressive-scale must be in (0, 1), got {config.progressive_scale}")
    if config.resize_mode == "fit":
        raise ConfigError("--progressive: --resize-mode fit pads each image to the model's input; use resize, crop "
                          "or scale_crop")
    low = progressive_size(config, stride)
    if low == list(config.image_size):
        raise ConfigError(f"--progressive-scale {config.progressive_scale:g} of --image-size "
                          f"{config.image_size[0]}x{config.image_size[1]} rounds back to it (multiples of {stride})")


def _check_class_uniform(config):
    """A share in [0, 1]; a data directory whose train split has its class index (checked here, before
    anything heavy: it is a small file beside the shards)."""
    _check_number(config, "class_uniform", 0)
    if config.class_uniform > 1:
        raise ConfigError(f"--class-uniform must be a share in [0, 1], got {config.class_uniform}")
    if not config.class_uniform:
        return
    if config.cache not in (None, "memory"):
        raise ConfigError(f"--class-uniform reads examples by their place in the split: use --cache memory or no "
                          f"cache (a file cache, --cache {config.cache}, is read in order only)")
    if config.demo:
        raise ConfigError("--class-uniform needs --data DIR converted by tools/make_tfrecords.py (the demo dataset "
                          "has no class index)")
    if config.data:
        from keras_seg import tfrecord

        try:
            info = tfrecord.load_dataset_info(config.data)
        except tfrecord.DatasetFormatError:
            return  # the data check names what is wrong with the directory
        if "train" in info["splits"]:
            try:
                tfrecord.load_class_index(config.data, "train", info)
            except tfrecord.DatasetFormatError as err:
                raise ConfigError(f"--class-uniform: {err}") from None


def _check_choice(name, value, choices):
    if value not in choices:
        raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}")


def _check_number(config, name, low, *, above=False, kind=float):
    value = getattr(config, name)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or (kind is int and not float(value).is_integer()):
        raise ConfigError(f"--{name.replace('_', '-')} must be {'an integer' if kind is int else 'a number'}, "
                          f"got {value!r}")
    if (value <= low) if above else (value < low):
        raise ConfigError(f"--{name.replace('_', '-')} must be {'>' if above else '>='} {low}, got {value}")
    setattr(config, name, kind(value))


def _check_encoder_controls(config):
    from keras_seg.models.presets import PRESETS, encoder_of

    freeze = config.freeze_encoder
    if freeze != "all" and not (isinstance(freeze, int) and not isinstance(freeze, bool) and freeze >= 0):
        raise ConfigError(f"--freeze-encoder: expected a step count >= 0 or nothing (the whole run), got {freeze!r}")
    _check_number(config, "encoder_lr_mult", 0)
    asked = [flag for flag, on in (("--freeze-encoder", freeze != 0),
                                   ("--encoder-lr-mult", config.encoder_lr_mult != 1),
                                   ("--freeze-encoder-bn", config.freeze_encoder_bn),
                                   ("--encoder-weights", config.encoder_weights not in (None, "none"))) if on]
    if freeze == "all" and (config.encoder_lr_mult != 1 or config.freeze_encoder_bn):
        raise ConfigError("--freeze-encoder for the whole run leaves nothing for --encoder-lr-mult or "
                          "--freeze-encoder-bn to act on (give --freeze-encoder STEPS to train it later)")
    if asked and encoder_of(config.model) is None:
        with_encoder = [name for name, entry in PRESETS.items() if encoder_of(entry["model"])]
        raise ConfigError(f"{asked[0]}: preset {config.preset}'s model has no ImageNet encoder (presets with one: "
                          f"{', '.join(with_encoder)})")


def validate(config: TrainConfig) -> TrainConfig:
    """Check every value; raise `ConfigError` with one line naming the option. Returns `config`."""
    _check_choice("optimizer", config.optimizer, OPTIMIZERS)
    _check_choice("schedule", config.schedule, SCHEDULES)
    _check_choice("resize_mode", config.resize_mode, RESIZE_MODES)
    _check_choice("precision", config.precision, PRECISIONS)
    _check_choice("strategy", config.strategy, STRATEGIES)
    for name in ("batch_size", "val_batch_size", "steps_per_call", "accumulate", "plateau_patience"):
        _check_number(config, name, 1, kind=int)
    for name in ("iters", "epochs", "steps_per_epoch", "val_every", "checkpoint_every", "patience",
                 "scale_lr_to_batch", "seed", "devices"):
        _check_number(config, name, 0, kind=int)
    if config.warmup_iters is not None:
        _check_number(config, "warmup_iters", 0, kind=int)
    for name in ("time_budget", "warmup_epochs", "weight_decay", "clipnorm", "momentum"):
        _check_number(config, name, 0)
    _check_number(config, "learning_rate", 0, above=True)
    _check_number(config, "poly_power", 0, above=True)
    _check_number(config, "plateau_factor", 0, above=True)
    if not 0 <= config.val_share < 1:
        raise ConfigError(f"--val-share must be in [0, 1) (a share of the time budget), got {config.val_share}")
    if config.plateau_factor >= 1:
        raise ConfigError(f"--plateau-factor must be < 1 (it cuts the learning rate), got {config.plateau_factor}")
    if config.final_lr_ratio is not None:
        _check_number(config, "final_lr_ratio", 0)
    _check_encoder_controls(config)
    if sum(bool(v) for v in (config.iters, config.epochs, config.time_budget)) != 1:
        raise ConfigError("a run needs exactly one of --iters N, --epochs N, --time-budget MINUTES")
    if config.strategy == "tpu":
        raise ConfigError("--strategy tpu is not supported: the confusion-matrix metrics count pixels in a float64 "
                          "variable, which TPUs lack, and float32 or int32 counts are inexact or overflow over a "
                          "full-resolution epoch")
    if config.time_budget and _several_workers(config.strategy):
        raise ConfigError("--time-budget cannot be used with --strategy multiworker: each worker would plan its "
                          "length and validations from its own clock (workers ending apart hang); give --iters")
    if config.devices and config.strategy != "mirrored":
        raise ConfigError("--devices applies to --strategy mirrored only")
    if config.weight_decay_mode not in ("decoupled", "l2"):
        raise ConfigError(f"--weight-decay-mode must be decoupled or l2, got {config.weight_decay_mode!r}")
    if config.nesterov and config.optimizer != "sgd":
        raise ConfigError("--nesterov applies to --optimizer sgd only")
    if not isinstance(config.image_size, (list, tuple)) or len(config.image_size) != 2:
        raise ConfigError(f"--image-size must be HxW, got {config.image_size!r}")
    config.image_size = [int(v) for v in config.image_size]
    height, width = config.image_size
    stride = model_stride(config.model)
    if height < 1 or width < 1 or height % stride or width % stride:
        raise ConfigError(f"--image-size {height}x{width}: both sides must be positive multiples of {stride}, "
                          f"the stride of this {config.model.get('architecture')} model")
    _check_model_args(config.model)
    _check_sizing(config, stride)
    _check_progressive(config, stride)
    _check_class_uniform(config)

    from keras_seg import losses
    from keras_seg.augment import AugmentConfig

    try:
        config.augment = AugmentConfig.from_dict(config.augment).to_dict()  # every setting spelled out
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--augment: {err}") from err
    if config.resize_mode == "scale_crop" and config.augment["scale_prob"] > 0:
        raise ConfigError("--resize-mode scale_crop draws the scale in the reader (--ratio-range): the on-device "
                          "scale must be off (--augment scale_prob=0)")
    try:
        losses.parse_loss_spec(config.loss)
    except ValueError as err:
        raise ConfigError(f"--loss: {err}") from err
    weights = config.class_weights
    if isinstance(weights, str) and weights not in CLASS_WEIGHT_METHODS:
        try:
            config.class_weights = [float(v) for v in weights.split(",")]
        except ValueError as err:
            raise ConfigError(f"--class-weights: expected {', '.join(CLASS_WEIGHT_METHODS)} or numbers, got "
                              f"{weights!r}") from err
    return config


def _several_workers(strategy: str) -> bool:
    """Whether the run is multi-worker: asked for, or `auto` with TF_CONFIG listing several workers."""
    if strategy == "multiworker":
        return True
    import json
    import os

    try:
        cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {})
    except (ValueError, AttributeError):
        return False  # the strategy's own check reports a bad TF_CONFIG
    return strategy == "auto" and sum(len(v) for v in cluster.values()) > 1  # as distribute.choose_strategy


def _check_sizing(config: TrainConfig, stride: int):
    """The reader's sizing options, and the inference contract they imply (`config.inference`)."""
    from keras_seg import contract

    if config.inference_mode is not None:
        _check_choice("inference_mode", config.inference_mode, INFERENCE_MODES)
    _check_number(config, "inference_overlap", 0)
    if config.inference_overlap >= 1:
        raise ConfigError(f"--inference-overlap must be < 1, got {config.inference_overlap}")
    if config.resize_mode != "scale_crop":
        if config.base_scale is not None or config.inference_mode is not None:
            raise ConfigError("--base-scale and --inference-mode apply to --resize-mode scale_crop only")
    else:
        if not isinstance(config.base_scale, (list, tuple)) or len(config.base_scale) != 2:
            raise ConfigError("--resize-mode scale_crop needs --base-scale HxW (e.g. 1024x2048 for Cityscapes, "
                              "512x2048 for VOC), the size the random ratios multiply")
        config.base_scale = [int(v) for v in config.base_scale]
        if min(config.base_scale) < 1:
            raise ConfigError(f"--base-scale must be positive, got {config.base_scale}")
        if config.inference_mode == "whole" and any(v % stride for v in config.base_scale):
            raise ConfigError(f"--inference-mode whole runs the model at --base-scale {config.base_scale[0]}x"
                              f"{config.base_scale[1]}: both sides must be multiples of {stride}")
        low, high = (float(v) for v in config.ratio_range)
        if not 0 < low <= high:
            raise ConfigError(f"--ratio-range must be LOW,HIGH with 0 < LOW <= HIGH, got {config.ratio_range}")
        config.ratio_range = [low, high]
        _check_number(config, "cat_max_ratio", 0, above=True)
        if config.cat_max_ratio > 1:
            raise ConfigError(f"--cat-max-ratio must be in (0, 1] (1: off), got {config.cat_max_ratio}")
    # "whole" contracts run the model at each image's own size (and each TTA ratio's) padded to a
    # multiple of its stride, through a (None, None)-input copy (an encoder's U-Net needs 32 whatever
    # its depth). DDRNet's DAPPM pools over windows fixed by its input size: no divisor, its whole
    # images are padded to the input size as before.
    divisor = None if config.model.get("architecture") == "ddrnet" else (
        max(stride, 32) if config.model.get("encoder") else stride)
    config.inference = contract.for_training(config.resize_mode, config.image_size, config.base_scale,
                                             config.inference_mode, config.inference_overlap, divisor).to_dict()


def _check_model_args(model: dict):
    """Every --model-arg names an argument of the architecture's builder."""
    from keras_seg.models.presets import ARCHITECTURES, BUILD_ARGUMENTS, builder_for

    architecture = model.get("architecture")
    if architecture not in ARCHITECTURES:
        raise ConfigError(f"model architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}")
    accepted = set(inspect.signature(builder_for(model)).parameters) - set(BUILD_ARGUMENTS)
    unknown = sorted(set(model) - accepted - {"architecture"})
    if unknown:
        raise ConfigError(f"--model-arg {unknown[0]}: not an argument of the {architecture} builder "
                          f"(it takes {', '.join(sorted(accepted))})")
