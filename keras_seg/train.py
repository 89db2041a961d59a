"""Train a segmentation model: `python -m keras_seg.train --preset unet_silu [--data DIR] [overrides]`.

Without `--data` it trains on the built-in demo dataset (procedural street scenes, written once to
a cache directory) with the preset's demo settings. Every value of the resolved configuration can
be overridden from the command line; the resolved configuration is written to the run directory
with its provenance (command line, package versions, git commit, seed).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import re
import subprocess
import sys

from keras_seg.models.presets import get_preset, list_presets

SCHEDULES = ("constant", "cosine", "poly", "plateau")
OPTIMIZERS = ("adamw", "adam")
RESIZE_MODES = ("resize", "crop", "fit")

# Training defaults shared by every preset; a preset's "train" entry overrides them, and its "demo"
# entry overrides both when no --data is given.
TRAINING_DEFAULTS = {
    "epochs": 100,
    "batch_size": 8,
    "val_batch_size": 8,
    "resize_mode": "resize",
    "optimizer": "adamw",
    "learning_rate": 1e-3,
    "weight_decay": 1e-4,
    "schedule": "cosine",
    "warmup_epochs": 1.0,
    "plateau_patience": 3,
    "plateau_factor": 0.5,
    "clipnorm": 1.0,
    "loss": "ce",
    "class_weights": "none",
    "augment": {},
    "precision": "auto",
    "jit": False,
    "strategy": "auto",
    "seed": 0,
    "patience": 15,
    "max_steps": 0,
    "time_limit": 0,
    "steps_per_epoch": 0,
    "steps_per_call": 10,
    "cache": None,
    "encoder_weights": None,
}


class ConfigError(ValueError):
    """A bad command-line value, reported as one line before anything heavy starts."""


def _image_size(text):
    match = re.fullmatch(r"(\d+)[xX](\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected HxW such as 256x512, got {text!r}")
    return [int(match[1]), int(match[2])]


def _key_value(text):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        value = json.loads(value)
    except json.JSONDecodeError:
        pass  # a plain string
    return key.strip(), value


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_seg.train",
        description="Train a segmentation model. Without --data: the built-in demo dataset.",
    )
    parser.add_argument("--preset", default="unet_silu", choices=list_presets(),
                        help="model and training defaults (default: unet_silu)")
    parser.add_argument("--data", help="TFRecord directory from tools/make_tfrecords.py (needs train and val)")
    parser.add_argument("--output", help="run directory (default: runs/PRESET, or runs/PRESET-2, ... if taken)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run in --output")
    parser.add_argument("--overwrite", action="store_true", help="start afresh in an existing --output")
    parser.add_argument("--init-from", metavar="RUN", help="start from another run's best weights (fine-tuning)")
    parser.add_argument("--no-progress", action="store_true", help="no per-step progress bar")
    parser.add_argument("--no-export", action="store_true", help="do not export a SavedModel at the end")
    o = parser.add_argument_group("overrides (default: the preset's value)")
    o.add_argument("--epochs", type=int)
    o.add_argument("--batch-size", type=int, help="per replica; the global batch is this x replicas")
    o.add_argument("--val-batch-size", type=int)
    o.add_argument("--image-size", type=_image_size, metavar="HxW", help="training input size")
    o.add_argument("--resize-mode", choices=RESIZE_MODES, help="how the reader brings examples to --image-size")
    o.add_argument("--optimizer", choices=OPTIMIZERS)
    o.add_argument("--learning-rate", "--lr", type=float)
    o.add_argument("--weight-decay", type=float)
    o.add_argument("--schedule", choices=SCHEDULES)
    o.add_argument("--warmup-epochs", type=float, help="linear warm-up before the cosine schedule")
    o.add_argument("--plateau-patience", type=int, help="epochs without improvement before the plateau schedule "
                                                         "cuts the learning rate")
    o.add_argument("--plateau-factor", type=float)
    o.add_argument("--clipnorm", type=float, help="global gradient-norm clipping (0: off)")
    o.add_argument("--loss", help="ce, dice, focal, or a weighted sum such as ce+dice or ce+0.5*dice")
    o.add_argument("--class-weights", help="none, inverse, median, enet (from the training pixel counts), "
                                           "or a comma-separated list of per-class weights")
    o.add_argument("--augment", type=_key_value, action="append", metavar="KEY=VALUE",
                   help="augmentation setting (see the README), repeatable, e.g. --augment occlusion_prob=0.5")
    o.add_argument("--no-augment", action="store_true", help="turn every augmentation off")
    o.add_argument("--model-arg", type=_key_value, action="append", metavar="KEY=VALUE",
                   help="model builder argument, repeatable, e.g. --model-arg base_filters=32")
    o.add_argument("--precision", choices=("auto", "float32", "mixed_float16", "mixed_bfloat16"))
    o.add_argument("--jit", action=argparse.BooleanOptionalAction, default=None, help="XLA-compile the step")
    o.add_argument("--strategy", choices=("auto", "one", "mirrored", "multiworker", "tpu"))
    o.add_argument("--seed", type=int)
    o.add_argument("--patience", type=int, help="early stopping: epochs without val mIoU improvement (0: off)")
    o.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in all (0: no limit)")
    o.add_argument("--steps-per-epoch", type=int, help="0: one pass over the training split")
    o.add_argument("--time-limit", type=float, metavar="MINUTES",
                   help="do not start an epoch that would end after this many minutes of training (0: none)")
    o.add_argument("--cache", help="'memory' or a file prefix: cache decoded examples")
    o.add_argument("--encoder-weights", help="local weights file for the FCN encoders (nothing is downloaded)")
    return parser


def resolve_config(args, demo_dir=None) -> dict:
    """Preset defaults (+ demo settings without --data) + command-line overrides, validated."""
    preset = get_preset(args.preset)
    config = copy.deepcopy(TRAINING_DEFAULTS)
    config.update(copy.deepcopy(preset.get("train", {})))
    config["model"] = copy.deepcopy(preset["model"])
    config["image_size"] = list(preset["input_size"])
    if args.data is None:
        demo = copy.deepcopy(preset.get("demo", {}))
        config["model"].update(demo.pop("model", {}))
        config.update(demo)
    for key in TRAINING_DEFAULTS.keys() | {"image_size"}:
        value = getattr(args, key, None)
        if value is not None and key != "augment":
            config[key] = value
    for key, value in args.model_arg or []:
        config["model"][key] = value
    if args.no_augment:
        from keras_seg.augment import AugmentConfig

        config["augment"] = AugmentConfig.disabled().to_dict()
    for key, value in args.augment or []:
        config["augment"][key] = value
    config.update(preset=args.preset, data=args.data or demo_dir, resume=args.resume, init_from=args.init_from,
                  progress=not args.no_progress, export=not args.no_export, demo=args.data is None)
    validate_config(config)
    return config


def model_stride(model_config) -> int:
    """The factor the input size must be divisible by."""
    if model_config.get("architecture") == "unet":
        return 2 ** int(model_config.get("depth", 4)) * int(model_config.get("stem_stride", 1))
    return 32


def validate_config(config):
    """One-line errors for values that would otherwise fail deep inside TensorFlow."""
    from keras_seg.augment import AugmentConfig

    height, width = config["image_size"]
    stride = model_stride(config["model"])
    if height < 1 or width < 1 or height % stride or width % stride:
        raise ConfigError(f"--image-size {height}x{width}: both sides must be positive multiples of {stride}, "
                          f"the stride of this {config['model'].get('architecture')} model")
    for key in ("epochs", "batch_size", "val_batch_size", "steps_per_call"):
        if int(config[key]) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {config[key]}")
    for key in ("max_steps", "steps_per_epoch", "patience", "time_limit"):
        if int(config[key]) < 0:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 0, got {config[key]}")
    if not config["learning_rate"] > 0:
        raise ConfigError(f"--learning-rate must be > 0, got {config['learning_rate']}")
    try:
        augment = AugmentConfig.from_dict(config["augment"])
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--augment: {err}") from err
    config["augment"] = augment.to_dict()  # every setting spelled out in the recorded config
    from keras_seg import losses

    try:
        losses.parse_loss_spec(config["loss"])
    except ValueError as err:
        raise ConfigError(f"--loss: {err}") from err
    weights = config["class_weights"]
    if isinstance(weights, str) and weights not in ("none", "inverse", "median", "enet"):
        try:
            config["class_weights"] = [float(v) for v in weights.split(",")]
        except ValueError as err:
            raise ConfigError(f"--class-weights: expected none, inverse, median, enet or numbers, got "
                              f"{weights!r}") from err


def default_output(preset: str) -> str:
    base = os.path.join("runs", preset)
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def provenance(argv) -> dict:
    """What made this run: command line, versions, git commit (when in a checkout), host."""
    import keras
    import numpy
    import tensorflow

    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    from keras_seg import __version__

    return {
        "command": " ".join([sys.executable, "-m", "keras_seg.train", *argv]),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"keras_seg": __version__, "tensorflow": tensorflow.__version__, "keras": keras.__version__,
                     "numpy": numpy.__version__, "python": platform.python_version()},
        "git_commit": commit,
        "host": platform.node(),
    }


def check_data(config):
    """The data directory has train and val splits in the documented format."""
    from keras_seg import tfrecord

    try:
        info = tfrecord.load_dataset_info(config["data"])
    except tfrecord.DatasetFormatError as err:
        raise ConfigError(f"--data: {err}") from err
    for split in ("train", "val"):
        if split not in info["splits"]:
            raise ConfigError(f"--data {config['data']}: no '{split}' split (it has {sorted(info['splits'])}); "
                              "convert one, e.g. with --val-fraction")
    if isinstance(config["class_weights"], list) and len(config["class_weights"]) != info["num_classes"]:
        raise ConfigError(f"--class-weights: {len(config['class_weights'])} weights for {info['num_classes']} classes")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        config = resolve_config(args)
        if args.resume and args.overwrite:
            raise ConfigError("--resume continues a run, --overwrite starts it afresh: choose one")
        if args.resume or args.overwrite:
            if not args.output:
                raise ConfigError("--resume and --overwrite need --output RUN_DIR")
        output = args.output or default_output(args.preset)
        if args.resume and not os.path.isdir(os.path.join(output, "checkpoints")):
            raise ConfigError(f"--resume: {output} holds no checkpoints to continue from")
        if not args.resume and os.path.isdir(output) and os.listdir(output):
            if not args.overwrite:
                raise ConfigError(f"--output {output} exists and is not empty: --resume to continue it, "
                                  "--overwrite to start afresh, or choose another")
            import shutil

            shutil.rmtree(output)
        config["output"] = output
        if args.resume:
            config = _resumed_config(output, args.epochs, config["progress"])
        if config["data"] is None:
            from keras_seg.demo import default_cache_dir, write_demo_dataset

            config["data"] = write_demo_dataset(default_cache_dir())
        check_data(config)
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    config["provenance"] = provenance(argv)

    from keras_seg.trainer import Trainer

    try:
        summary = Trainer(config).run()
    except KeyboardInterrupt:
        print(f"\ninterrupted: continue with --resume --output {config['output']}", file=sys.stderr)
        return 130
    if summary:
        print(f"best val mIoU {summary.get('miou', float('nan')):.4f} (epoch {summary.get('epoch')}); "
              f"run directory {config['output']}")
    return 0


def _resumed_config(output, epochs, progress):
    """A resumed run keeps its recorded configuration; only the epoch budget (--epochs) may change."""
    with open(os.path.join(output, "config.json")) as f:
        recorded = json.load(f)
    recorded.pop("resolved", None)
    recorded.update(resume=True, progress=progress, output=output)
    if epochs is not None:
        recorded["epochs"] = epochs
    return recorded


if __name__ == "__main__":
    sys.exit(main())
