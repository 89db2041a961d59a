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
import signal
import subprocess
import sys

from keras_seg.quiet import import_tensorflow, native_stderr_filtered_while_running

import_tensorflow()  # before the imports below bring TensorFlow in: without its start-up noise

from keras_seg.config import ConfigError, TrainConfig, set_length, validate  # noqa: E402
from keras_seg.config import OPTIMIZERS, PRECISIONS, RESIZE_MODES, SCHEDULES, STRATEGIES  # noqa: E402, F401
from keras_seg.models.presets import get_preset, list_presets  # noqa: E402
from keras_seg.recipes import RECIPES, get_recipe  # noqa: E402

# Settings a resumed run may change: they decide how long it runs and what it reports, not what
# it computes on the way. Every other setting is refused with --resume (the run continues as recorded).
RESUMABLE = ("iters", "epochs", "time_budget", "val_every", "val_share", "checkpoint_every", "steps_per_call")
LENGTH_KEYS = ("iters", "epochs", "time_budget")


def _ratio_range(text):
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH such as 0.5,2.0, got {text!r}") from None
    return [low, high]


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
    parser.add_argument("--recipe", choices=list(RECIPES),
                        help="full-resolution training settings over the preset's: cityscapes_fullres, voc_fullres "
                             "(docs/training.md#full-resolution-recipes)")
    parser.add_argument("--data", help="TFRecord directory from tools/make_tfrecords.py (needs train and val)")
    parser.add_argument("--output", help="run directory (default: runs/PRESET, or runs/PRESET-2, ... if taken)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run in --output")
    parser.add_argument("--overwrite", action="store_true", help="start afresh in an existing --output")
    parser.add_argument("--init-from", metavar="RUN", help="start from another run's best weights (fine-tuning)")
    parser.add_argument("--no-progress", action="store_true", help="no per-step progress bar")
    parser.add_argument("--no-export", action="store_true", help="do not export a SavedModel at the end")
    length = parser.add_argument_group("length and cadence (one of --iters, --epochs, --time-budget)")
    length.add_argument("--iters", type=int, metavar="N", help="optimizer steps in all")
    length.add_argument("--epochs", type=int, metavar="N", help="passes over the training split")
    length.add_argument("--time-budget", type=float, metavar="MINUTES",
                        help="size the run so that it ends, export included, this many minutes after the "
                             "process started; the schedule ends with it")
    length.add_argument("--steps-per-epoch", type=int, help="0: one pass over the training split")
    length.add_argument("--val-every", type=int, metavar="STEPS",
                        help="validate every this many steps (default: every epoch with --epochs, else 10 times a run)")
    length.add_argument("--val-share", type=float, metavar="SHARE",
                        help="time budget: the most of it that validations during the run may take (default 0.1); "
                             "on a slow machine fewer validations, or a part of the val split")
    length.add_argument("--checkpoint-every", type=int, metavar="STEPS", help="default: with every validation")
    length.add_argument("--steps-per-call", type=int, help="steps run by one call of the compiled loop")
    length.add_argument("--time-limit", type=float, help=argparse.SUPPRESS)  # retired: a clear error
    length.add_argument("--max-steps", type=int, help=argparse.SUPPRESS)  # retired: a clear error
    o = parser.add_argument_group("overrides (default: the preset's value)")
    o.add_argument("--batch-size", type=int, help="per replica; the global batch is this x replicas")
    o.add_argument("--val-batch-size", type=int)
    o.add_argument("--accumulate", type=int, metavar="N", help="gradients of N batches make one optimizer step")
    o.add_argument("--scale-lr-to-batch", type=int, metavar="B",
                   help="the learning rate is meant for a global batch of B: scale it to the actual one "
                        "(batch x replicas x accumulate), as MMSegmentation's auto_scale_lr")
    o.add_argument("--image-size", type=_image_size, metavar="HxW", help="training input size")
    o.add_argument("--resize-mode", choices=RESIZE_MODES,
                   help="how the reader brings examples to --image-size: resize (stretch), crop, fit (aspect kept, "
                        "padded), scale_crop (whole image rescaled by a random ratio of --base-scale, then a random "
                        "crop: docs/data.md)")
    o.add_argument("--base-scale", type=_image_size, metavar="HxW",
                   help="scale_crop: the scale the random ratios multiply, aspect kept (Cityscapes 1024x2048)")
    o.add_argument("--ratio-range", type=_ratio_range, metavar="LOW,HIGH", help="scale_crop: default 0.5,2.0")
    o.add_argument("--cat-max-ratio", type=float,
                   help="scale_crop: retry (up to 10 times) crops where one class holds more than this share of the "
                        "labelled pixels (MMSegmentation's 0.75; default 1: off)")
    o.add_argument("--class-uniform", type=float, metavar="P",
                   help="draw this share of training examples class-uniformly: a class uniform among those the "
                        "train split holds, a record holding it, the crop centred on it (crop, scale_crop; resize "
                        "and fit pick the record only); needs the class index tools/make_tfrecords.py writes "
                        "(docs/data.md; default 0: off)")
    o.add_argument("--inference-mode", choices=("whole", "slide"),
                   help="scale_crop: infer whole images at --base-scale, or sliding --image-size windows "
                        "(default: slide)")
    o.add_argument("--inference-overlap", type=float, help="share of a sliding window its neighbour covers again "
                                                            "(default: 1/3)")
    o.add_argument("--progressive", type=float, metavar="SHARE",
                   help="progressive resizing: train the first SHARE of the schedule's progress (e.g. 0.7) at "
                        "--progressive-scale of --image-size, the rest at --image-size (default 0: off)")
    o.add_argument("--progressive-scale", type=float, metavar="S",
                   help="the first phase's size over --image-size (default 0.5; rounded to the model's stride)")
    o.add_argument("--optimizer", choices=OPTIMIZERS)
    o.add_argument("--learning-rate", "--lr", type=float)
    o.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    o.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None, help="Nesterov momentum (SGD)")
    o.add_argument("--weight-decay", type=float, help="decoupled: not applied to biases and normalisation parameters")
    o.add_argument("--weight-decay-mode", choices=("decoupled", "l2"),
                   help="decoupled (Keras: w -= lr*wd*w after the update) or l2 (PyTorch's SGD: wd*w added to every "
                        "gradient before the momentum; the full-resolution recipes)")
    o.add_argument("--schedule", choices=SCHEDULES,
                   help="learning-rate shape after the warm-up; plateau: constant, cut on plateaus")
    o.add_argument("--warmup-iters", type=int, help="linear warm-up steps (takes precedence over --warmup-epochs)")
    o.add_argument("--warmup-epochs", type=float, help="linear warm-up, in epochs")
    o.add_argument("--final-lr-ratio", type=float,
                   help="the rate at the end of the decay over the base rate (default: cosine and poly 0.01, linear 0)")
    o.add_argument("--poly-power", type=float, help="exponent of the poly schedule (default 0.9)")
    o.add_argument("--plateau-patience", type=int, help="validations without improvement before the plateau "
                                                         "schedule cuts the learning rate")
    o.add_argument("--plateau-factor", type=float)
    o.add_argument("--clipnorm", type=float, help="global gradient-norm clipping (0: off)")
    o.add_argument("--loss", help="ce, dice, focal, ohem, lovasz, lovasz_image (_all: every class, not only those "
                                  "present), or a weighted sum such as ce+dice or ce+0.5*lovasz")
    o.add_argument("--class-weights", help="none, inverse, median, enet (from the training pixel counts), "
                                           "or a comma-separated list of per-class weights")
    o.add_argument("--augment", type=_key_value, action="append", metavar="KEY=VALUE",
                   help="augmentation setting (docs/data.md), repeatable, e.g. --augment occlusion_prob=0.5")
    o.add_argument("--no-augment", action="store_true", default=None, help="turn every augmentation off")
    o.add_argument("--model-arg", type=_key_value, action="append", metavar="KEY=VALUE",
                   help="model builder argument, repeatable, e.g. --model-arg base_filters=32")
    o.add_argument("--precision", choices=PRECISIONS)
    o.add_argument("--jit", action=argparse.BooleanOptionalAction, default=None, help="XLA-compile the step")
    o.add_argument("--strategy", choices=STRATEGIES)
    o.add_argument("--devices", type=int, metavar="N",
                   help="with --strategy mirrored: the first N GPUs, or on a machine without GPUs N logical CPUs "
                        "(to check multi-device training on a CPU)")
    o.add_argument("--seed", type=int)
    o.add_argument("--patience", type=int, help="early stopping: validations without val mIoU improvement (0: off)")
    o.add_argument("--cache", help="'memory' or a file prefix: cache decoded examples")
    o.add_argument("--encoder-weights", metavar="imagenet|none|PATH",
                   help="the ImageNet encoder's initial weights: imagenet (downloaded once into $KERAS_HOME/models), "
                        "none (random), or a local .weights.h5 / legacy *_notop.h5 file (default: the preset's)")
    o.add_argument("--freeze-encoder", nargs="?", const="all", type=_freeze_steps, metavar="STEPS",
                   help="keep the encoder's weights as loaded: for the first STEPS steps, or the whole run")
    o.add_argument("--encoder-lr-mult", type=float, metavar="X",
                   help="scale the encoder's updates by X (its learning rate relative to the decoder's; default 1)")
    o.add_argument("--freeze-encoder-bn", action="store_true", default=None,
                   help="run the encoder's batch norms in inference mode with fixed parameters (small batches)")
    return parser


def _freeze_steps(text):
    if text == "all":
        return "all"
    try:
        steps = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step count or nothing, got {text!r}") from None
    if steps < 0:
        raise argparse.ArgumentTypeError(f"expected a step count >= 0, got {steps}")
    return steps


# Flags that are not TrainConfig fields of the same name.
_NOT_SETTINGS = {"preset", "data", "output", "resume", "overwrite", "init_from", "no_progress", "no_export",
                 "augment", "no_augment", "model_arg", "time_limit", "max_steps"}


def given_settings(args) -> dict:
    """The TrainConfig settings given on the command line (None: not given)."""
    return {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS and v is not None}


def _apply(config: TrainConfig, values: dict):
    values = dict(values)
    set_length(config, **{k: values.pop(k) for k in LENGTH_KEYS if k in values})
    model = values.pop("model", None)
    if model:
        config.model.update(model)
    for key, value in values.items():
        if key not in TrainConfig.field_names():
            raise ConfigError(f"unknown setting {key!r}")
        setattr(config, key, value)


def resolve_config(args, demo_dir=None) -> TrainConfig:
    """Defaults < the preset's "train" < its "demo" (without --data) < the command line; validated."""
    for retired in ("time_limit", "max_steps"):
        if getattr(args, retired, None) is not None:
            raise ConfigError(RETIRED_FLAGS[retired])
    preset = get_preset(args.preset)
    config = TrainConfig(preset=args.preset, model=copy.deepcopy(preset["model"]),
                         image_size=list(preset["input_size"]))
    _apply(config, copy.deepcopy(preset.get("train", {})))
    if args.recipe:
        if args.data is None:
            raise ConfigError(f"--recipe {args.recipe} is for the full-resolution data set: give --data DIR")
        _apply(config, get_recipe(args.recipe))
    if args.data is None:
        _apply(config, copy.deepcopy(preset.get("demo", {})))
    given = given_settings(args)
    set_length(config, **{k: given.pop(k) for k in LENGTH_KEYS if k in given})
    for key, value in given.items():
        setattr(config, key, value)
    for key, value in args.model_arg or []:
        config.model[key] = value
    if args.no_augment:
        from keras_seg.augment import AugmentConfig

        config.augment = AugmentConfig.disabled().to_dict()
    for key, value in args.augment or []:
        config.augment[key] = value
    if config.resize_mode == "scale_crop":
        on_device = [key for key, _ in args.augment or [] if key in ("scale_prob", "scale_range")]
        if on_device:
            raise ConfigError(f"--augment {on_device[0]}: with --resize-mode scale_crop the reader draws the scale "
                              "(--ratio-range); the on-device scale is off")
        config.augment["scale_prob"] = 0.0  # the preset's on-device scale gives way to the reader's
    config.data = args.data or demo_dir
    config.demo = args.data is None
    config.resume, config.init_from = args.resume, args.init_from
    if args.init_from:
        # The model takes the run's weights: the config records that no encoder weights were loaded.
        if "encoder_weights" in given:
            raise ConfigError("--init-from gives the whole model its weights: leave out --encoder-weights")
        config.encoder_weights = None
    config.progress, config.export = not args.no_progress, not args.no_export
    return validate(config)


RETIRED_FLAGS = {
    "time_limit": "--time-limit was replaced by --time-budget MINUTES, which sizes the whole run (schedule "
                  "included) to end in time",
    "max_steps": "--max-steps was replaced by --iters N",
}


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
        info = tfrecord.load_dataset_info(config.data)
    except tfrecord.DatasetFormatError as err:
        raise ConfigError(f"--data: {err}") from err
    if "train" not in info["splits"]:
        raise ConfigError(f"--data {config.data}: no 'train' split (it has {sorted(info['splits'])})")
    if tfrecord.validation_split(info) is None:
        raise ConfigError(f"--data {config.data}: no 'val' (or 'validation') split (it has {sorted(info['splits'])}); "
                          "convert one, e.g. with --val-fraction")
    if isinstance(config.class_weights, list) and len(config.class_weights) != info["num_classes"]:
        raise ConfigError(f"--class-weights: {len(config.class_weights)} weights for {info['num_classes']} classes")


def check_encoder_weights(config):
    """Encoder weights that cannot be had or do not fit: a one-line error before anything heavy.

    "imagenet" is downloaded here (once; then cached). With --init-from the run's weights replace them.
    """
    from keras_seg.models import encoders
    from keras_seg.models.presets import encoder_of

    encoder = encoder_of(config.model)
    if encoder is None or config.init_from:
        return
    try:
        encoders.check_encoder_weights(encoder, config.encoder_weights)
    except encoders.EncoderWeightsError as err:
        raise ConfigError(str(err)) from None


def is_run_directory(path) -> bool:
    """A directory `keras_seg.train` wrote: its config.json and checkpoints/."""
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "checkpoints"))


def check_output(output, config, overwrite, chief=True):
    """A new run's --output: apart from the data and the file cache (neither the same directory, nor
    inside the data, nor holding either), and, when it exists, empty or a run directory that --overwrite
    may replace. Anything else a user keeps there is never deleted."""
    from keras_seg.demo import default_cache_dir

    target = os.path.realpath(output)
    guarded = [("--data", config.data or default_cache_dir(), True)]  # the demo's data, when no --data
    if config.cache not in (None, "memory"):
        # Its files lie directly in the prefix's directory: a run folder below it holds none of them.
        guarded.append(("--cache", os.path.dirname(os.path.abspath(config.cache)) or os.sep, False))
    for flag, directory, below_too in guarded:
        real = os.path.realpath(directory)
        common = os.path.commonpath([target, real])
        if common == target or (below_too and common == real):
            where = ("is" if target == real else "holds" if common == target else "is inside")
            raise ConfigError(f"--output {output} {where} the {flag} directory {directory}: choose a run "
                              "directory apart from it")
    if os.path.exists(output) and not os.path.isdir(output):
        raise ConfigError(f"--output {output} is a file, not a directory: choose another")
    if not chief or not os.path.isdir(output) or not os.listdir(output):
        return
    if not overwrite:
        raise ConfigError(f"--output {output} exists and is not empty: --resume to continue it, --overwrite to "
                          "start afresh, or choose another")
    if not is_run_directory(output):
        raise ConfigError(f"--output {output} is not a run directory (no config.json and checkpoints/) and is not "
                          "empty: --overwrite replaces runs only; choose another --output")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.resume and args.overwrite:
            raise ConfigError("--resume continues a run, --overwrite starts it afresh: choose one")
        if (args.resume or args.overwrite) and not args.output:
            raise ConfigError("--resume and --overwrite need --output RUN_DIR")
        output = args.output or default_output(args.preset)
        from keras_seg.distribute import is_chief_worker_from_env

        # In a multi-worker run only the chief prepares the run directory; the others leave it be.
        chief = is_chief_worker_from_env()
        if args.resume:
            config = resumed_config(output, args, argv)
        else:
            config = resolve_config(args)
            check_output(output, config, args.overwrite, chief)
            config.output = output
            config.provenance = provenance(argv)
        if config.data is None:
            from keras_seg.demo import default_cache_dir, write_demo_dataset

            config.data = write_demo_dataset(default_cache_dir(), progress=config.progress)
        check_data(config)
        if not args.resume:
            check_encoder_weights(config)  # may download: after the cheap checks, before the run directory
            if chief and args.overwrite and os.path.isdir(output) and os.listdir(output) and is_run_directory(output):
                import shutil

                shutil.rmtree(output)
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")

    from keras_seg.training.trainer import Trainer

    signal.signal(signal.SIGTERM, _interrupt)  # a preempted job checkpoints as on Ctrl-C
    try:
        with native_stderr_filtered_while_running():  # TensorFlow's known notices while it runs, dropped
            summary = Trainer(config).run()
    except ValueError as err:  # what the trainer finds wrong with the request (--devices, --cache, ...)
        parser.exit(2, f"error: {err}\n")
    except KeyboardInterrupt:
        print(f"\ninterrupted: checkpoint saved; continue with --resume --output {config.output}", file=sys.stderr)
        return 130
    if summary:
        report = os.path.join(config.output, "report.html")
        print(f"best val mIoU {summary.get('miou', float('nan')):.4f} (step {summary.get('step')}); "
              f"run directory {config.output}" + (f"; open {report}" if os.path.exists(report) else ""))
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def resumed_config(output, args, argv) -> TrainConfig:
    """The recorded configuration of the run in `output`, with what a resume may change.

    A resumed run continues as recorded: a flag that would change what it computes is refused.
    --iters / --epochs / --time-budget set a new length (the schedule is re-fitted from the step
    reached), and --val-every, --checkpoint-every, --steps-per-call, --no-progress, --no-export apply.
    """
    path = os.path.join(output, "config.json")
    if not os.path.isdir(os.path.join(output, "checkpoints")) or not os.path.exists(path):
        raise ConfigError(f"--resume: {output} holds no checkpoints to continue from")
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"--resume: {path}: {err}") from err
    if "total_steps" not in recorded.get("resolved", {}):
        raise ConfigError(f"--resume: {output} was trained by an earlier keras-seg, whose checkpoints hold no step "
                          "or input position: it cannot continue exactly; start a new run with --init-from "
                          f"{output}")
    config = TrainConfig.from_dict(recorded, source=path)
    # The same command again with --resume is fine: a flag is refused only if it changes a setting.
    if "--preset" not in argv and config.preset in list_presets():
        args.preset = config.preset  # compare against the run's preset, not the parser's default
    asked = resolve_config(args)
    compared = [k for k in given_settings(args) if k not in RESUMABLE]
    if args.no_augment:
        compared.append("augment")
    if args.init_from:
        compared.append("init_from")
    if "--preset" in argv:
        compared.append("preset")
    if "precision" in compared and asked.precision == config.resolved.get("precision"):
        # The precision the run was trained in, named where `auto` would choose another.
        compared = [k for k in compared if k != "precision"]
        config.precision = asked.precision
    changed = [k for k in compared if getattr(asked, k) != getattr(config, k)]
    changed += ["augment" for k, _ in args.augment or [] if asked.augment.get(k) != config.augment.get(k)]
    changed += ["model" for k, _ in args.model_arg or [] if asked.model.get(k) != config.model.get(k)]
    if args.data is not None and os.path.abspath(args.data) != os.path.abspath(config.data or ""):
        changed.insert(0, "data")
    if changed:
        flag = "--" + {"model": "model-arg"}.get(changed[0], changed[0]).replace("_", "-")
        raise ConfigError(f"--resume continues {output} as recorded: {flag} cannot change there (allowed: "
                          f"{', '.join('--' + k.replace('_', '-') for k in RESUMABLE)}, --no-progress, --no-export); "
                          "start a new run with --init-from to change it")

    given = given_settings(args)
    set_length(config, **{k: given.pop(k) for k in LENGTH_KEYS if k in given})
    for key, value in given.items():
        setattr(config, key, value)
    config.resume, config.output = True, output
    config.progress = not args.no_progress
    config.export = config.export and not args.no_export
    resumes = config.provenance.setdefault("resumes", [])
    resumes.append({k: v for k, v in provenance(argv).items() if k in ("command", "started", "host")})
    return validate(config)


def command(argv=None):
    """`python -m keras_seg.train` and `keras-seg-train`: `main`, then the process ends at once.

    Its output flushed and every file closed, the process exits without deleting the training
    iterator (`trainer.keep_until_exit`: that can wait for up to a minute) or tearing TensorFlow down.
    """
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    command()
