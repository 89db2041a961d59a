"""Evaluate a run or an exported SavedModel on a converted split.

    python -m keras_seg.evaluate --model RUN_OR_SAVEDMODEL --data DIR [--split val] [--flip | --tta]

One confusion matrix over the whole split (ground-truth 255 not counted) gives mIoU, per-class
IoU / accuracy / Dice, pixel accuracy, mean Dice and, for Cityscapes trainIds, the 7-category
mIoU. They are printed, and written with the matrix as `metrics.json`, `per_class_iou.txt` and
`confusion_matrix.png` to `--output` (default for a run: `RUN/evaluation/SPLIT-MODE`).

Every image is inferred whole, at its original resolution, by the model's inference contract
(`keras_seg.contract`: the scale it was trained at, whole image or sliding windows), and scored
there: by default the number training's validation reports. `--inference`, `--tile` and
`--overlap` change the contract; `--flip` averages with the mirror image; `--tta` averages over
the scale ratios 0.5-1.75 and flips, as MMSegmentation's `--tta`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np

from keras_seg.scoring import EvaluationError, check_label_spaces, evaluate_split  # noqa: F401 (public here too)

OUTPUT_NAMES = ("metrics.json", "per_class_iou.txt", "confusion_matrix.png")
RETIRED_FLAGS = {"--full-res": "--full-res is gone: evaluation is always at the original resolution now, by the "
                               "model's inference contract (--inference slide|whole to change it)"}


def parse_size(text: str) -> tuple:
    """"HxW" -> (H, W), for --tile."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise argparse.ArgumentTypeError(f"expected HxW with positive sides, such as 128x256, got {text!r}")
    return int(match[1]), int(match[2])


def parse_scales(text: str) -> tuple:
    try:
        scales = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ratios such as 0.5,1.0,1.5, got {text!r}") from None
    if not scales or min(scales) <= 0:
        raise argparse.ArgumentTypeError(f"scale ratios must be positive, got {text!r}")
    return scales


def add_inference_arguments(parser):
    """--inference, --tile, --overlap, --flip and --batch-size, shared with keras_seg.predict."""
    parser.add_argument("--inference", choices=("whole", "slide"),
                        help="change the model's inference contract: the whole rescaled image at once, or sliding "
                             "windows (default: the contract recorded with the model)")
    parser.add_argument("--tile", type=parse_size, metavar="HxW",
                        help="sliding-window size, the model's input (a run directory's model is rebuilt for it; an "
                             "export takes its own size only)")
    parser.add_argument("--overlap", type=float,
                        help="share of a sliding window its neighbour covers again, in [0, 1) (default: the "
                             "contract's, 1/3 as MMSegmentation)")
    parser.add_argument("--flip", action="store_true", help="average with the horizontally flipped image's prediction")


def check_retired_flags(parser, argv):
    """A flag of an earlier version gets a line saying what replaced it (argparse would only say "unrecognized")."""
    for flag, why in RETIRED_FLAGS.items():
        if flag in (sys.argv[1:] if argv is None else argv):
            parser.exit(2, f"error: {why}\n")


def check_inference_arguments(parser, args):
    if args.overlap is not None and not 0.0 <= args.overlap < 1.0:
        parser.exit(2, f"error: --overlap must be in [0, 1), got {args.overlap}\n")
    if getattr(args, "batch_size", 1) < 1:
        parser.exit(2, f"error: --batch-size must be >= 1, got {args.batch_size}\n")


def check_tile(parser, args):
    """--tile on a run: both sides multiples of its model's stride, said in one line before the model is
    rebuilt at that size (its builder would raise from inside Keras). An export's window is its own
    input size, which its loader checks."""
    if not args.tile:
        return
    model = os.fspath(args.model)
    run = os.path.dirname(os.path.abspath(model)) if model.endswith(".keras") else model
    try:
        with open(os.path.join(run, "config.json")) as f:
            model_config = json.load(f)["model"]
        from keras_seg.config import model_stride

        stride = model_stride(model_config)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # not a run (or a broken one): the loader says what it is
    height, width = args.tile
    if height % stride or width % stride:
        parser.exit(2, f"error: --tile {height}x{width}: both sides must be multiples of {stride}, the stride of "
                       f"the {model_config.get('architecture')} model of {run}\n")


def mode_name(args) -> str:
    """The evaluation folder's name part: "contract", or what changed it."""
    parts = []
    if args.inference:
        parts.append(args.inference)
    if args.tile:
        parts.append(f"{args.tile[0]}x{args.tile[1]}")
    if args.overlap is not None:
        parts.append(f"overlap{args.overlap:g}")
    if getattr(args, "tta", False):
        parts.append("tta")
    elif args.flip:
        parts.append("flip")
    return "-".join(parts) or "contract"


def report(summary, class_names, settings) -> dict:
    """The JSON written as metrics.json: settings, metrics by name, the confusion matrix (NaN -> null)."""
    from keras_seg.labels import CITYSCAPES_CATEGORIES

    def number(value):
        return None if value is None or np.isnan(value) else float(value)

    out = dict(settings)
    out.update({key: number(summary[key]) for key in ("miou", "mean_accuracy", "pixel_accuracy", "mean_dice")})
    if "category_miou" in summary:
        out["category_miou"] = number(summary["category_miou"])
        out["per_category_iou"] = {name: number(v) for name, v in zip(CITYSCAPES_CATEGORIES,
                                                                       summary["per_category_iou"])}
    out["per_class"] = {
        str(name): {"iou": number(iou), "accuracy": number(acc), "dice": number(dice)}
        for name, iou, acc, dice in zip(class_names, summary["per_class_iou"], summary["per_class_accuracy"],
                                        summary["per_class_dice"])
    }
    out["images"] = summary["images"]
    out["seconds"] = round(summary["seconds"], 3)
    out["confusion_matrix"] = np.asarray(summary["confusion_matrix"]).tolist()
    return out


def summary_lines(summary) -> list:
    def percent(value):
        return "-" if np.isnan(value) else f"{100 * value:.2f}"

    lines = [f"mIoU {percent(summary['miou'])}  pixel accuracy {percent(summary['pixel_accuracy'])}  "
             f"mean accuracy {percent(summary['mean_accuracy'])}  mean Dice {percent(summary['mean_dice'])}"]
    if "category_miou" in summary:
        lines.append(f"category mIoU {percent(summary['category_miou'])} (Cityscapes' 7 categories)")
    lines.append(f"{summary['images']} images in {summary['seconds']:.1f} s "
                 f"({summary['seconds'] / max(1, summary['images']):.3f} s per image)")
    return lines


def is_run(path) -> bool:
    """A run directory or a `.keras` file in one: the only models evaluate writes beside by default."""
    path = os.fspath(path)
    if path.endswith(".keras") and os.path.isfile(path):
        return True
    return os.path.isfile(os.path.join(path, "config.json"))


def default_output(segmenter, split, mode) -> str:
    root = segmenter.source if os.path.isdir(segmenter.source) else os.path.dirname(segmenter.source)
    return os.path.join(root, "evaluation", f"{split}-{mode}")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_seg.evaluate",
        description="Evaluate a training run or an exported SavedModel on a converted split: mIoU, per-class "
                    "IoU / accuracy / Dice, pixel accuracy, Cityscapes category mIoU, a confusion matrix PNG.",
    )
    parser.add_argument("--model", required=True, metavar="RUN_OR_SAVEDMODEL",
                        help="run directory (its best.keras), a .keras file in one, a keras_seg.export SavedModel "
                             "(a version folder, or the model folder: its highest version), or an exported .tflite, "
                             ".onnx or OpenVINO .xml (run by its own runtime)")
    parser.add_argument("--data", required=True, metavar="DIR", help="TFRecord directory from tools/make_tfrecords.py")
    parser.add_argument("--split", help="split to evaluate (default: val, or TFDS' validation)")
    parser.add_argument("--output", metavar="DIR",
                        help="where metrics.json, per_class_iou.txt and confusion_matrix.png go "
                             "(default for a run: RUN/evaluation/SPLIT-MODE; needed for a SavedModel)")
    parser.add_argument("--overwrite", action="store_true", help="replace those files when they exist")
    parser.add_argument("--report", metavar="FILE",
                        help="also write an HTML page (docs/report.md): the per-class chart, the confusion matrix and "
                             "the worst and best images, to compare an export with its float model at a glance")
    add_inference_arguments(parser)
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average over the scale ratios 0.5-1.75 and their flips "
                             "(MMSegmentation's --tta)")
    parser.add_argument("--scales", type=parse_scales, metavar="R,R,...",
                        help="scale ratios for --tta (default: 0.5,0.75,1.0,1.25,1.5,1.75)")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="images per model call when the split's images share one size (default: 4)")
    parser.add_argument("--limit", type=int, default=0, help="evaluate the first N images only (0: all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    check_retired_flags(parser, argv)
    args = parser.parse_args(argv)
    check_inference_arguments(parser, args)
    check_tile(parser, args)
    if args.limit < 0:
        parser.exit(2, f"error: --limit must be >= 0, got {args.limit}\n")
    if args.scales and not args.tta:
        parser.exit(2, "error: --scales applies with --tta\n")
    if args.report and (os.path.isdir(args.report) or (os.path.exists(args.report) and not args.overwrite)):
        parser.exit(2, f"error: --report {args.report} " + ("is a directory: give a file name such as report.html\n"
                                                           if os.path.isdir(args.report) else
                                                           "exists: --overwrite to replace it, or choose another\n"))
    from keras_seg.quiet import import_tensorflow

    import_tensorflow()
    import tensorflow as tf

    from keras_seg import contract, data, inference, metrics, visualize
    from keras_seg.files import write_json_atomically, write_text_atomically
    from keras_seg.tfrecord import DatasetFormatError, load_dataset_info, validation_split

    if not args.output and os.path.exists(args.model) and not is_run(args.model):
        # Said before the model loads: an export (SavedModel, .tflite, .onnx, .xml) is never written into.
        parser.exit(2, f"error: --output DIR is needed with an exported model ({args.model}): evaluate writes "
                       "beside a run only\n")
    flip = args.flip or args.tta
    scales = (args.scales or contract.TTA_SCALES) if args.tta else (1.0,)
    mode = mode_name(args)
    try:
        data_info = load_dataset_info(args.data)  # a bad --data fails before the model loads
        split = args.split or validation_split(data_info) or "val"
        segmenter = inference.load_segmenter(args.model, args.inference, args.tile, args.overlap)
        output = args.output or default_output(segmenter, split, mode)
        existing = [n for n in OUTPUT_NAMES if os.path.exists(os.path.join(output, n))]
        if existing and not args.overwrite:
            raise EvaluationError(f"{output} already holds {', '.join(existing)}: --overwrite to replace, or "
                                  "choose another --output")
        scores = None
        if args.report:
            from keras_seg.report import ImageScores

            scores = ImageScores(k=4)
        summary = evaluate_split(segmenter, args.data, split, flip, scales, args.batch_size, args.limit,
                                 progress=not args.no_progress, on_image=scores)
    except (EvaluationError, inference.InferenceError, DatasetFormatError, OSError) as err:
        parser.exit(2, f"error: {err}\n")
    except tf.errors.OpError as err:
        # A damaged shard met mid-split: name it (the shards are scanned only now, on error).
        found = data.damaged_shard(args.data, [split]) if isinstance(err, tf.errors.DataLossError) else None
        if found is None:
            found = f"reading {args.data} split {split!r}: {err.message.strip().splitlines()[0]}"
        parser.exit(2, f"error: {found}\n")

    class_names = segmenter.class_names
    settings = {"model": segmenter.source, "data": args.data, "split": split, "mode": mode,
                "inference": segmenter.info["inference"], "flip": flip, "scales": list(scales),
                "label_space": segmenter.label_space}
    table = metrics.format_table(summary["confusion_matrix"], class_names)
    lines = summary_lines(summary)
    print(table)
    print("\n".join(lines))
    os.makedirs(output, exist_ok=True)
    write_json_atomically(os.path.join(output, "metrics.json"), report(summary, class_names, settings))
    write_text_atomically(os.path.join(output, "per_class_iou.txt"),
                          f"{segmenter.source} on {args.data} {split} ({mode})\n{table}\n" + "\n".join(lines)
                          + "\n")
    title = f"{split} ({mode}): mIoU {100 * summary['miou']:.1f}%, rows: ground truth, % of its pixels"
    visualize.save_png_atomically(os.path.join(output, "confusion_matrix.png"),
                                  visualize.confusion_matrix_image(summary["confusion_matrix"], class_names,
                                                                   title=title))
    print(f"wrote {', '.join(OUTPUT_NAMES)} to {output}")
    if args.report:
        from keras_seg.report import write_evaluation_report

        write_evaluation_report(args.report, summary, scores, class_names, segmenter.colors, settings,
                                segmenter.ignore_index)
        print(f"report: {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
