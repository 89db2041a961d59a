"""Segment photos with a run or an exported SavedModel and write pictures (or Cityscapes labelId PNGs).

    python -m keras_seg.predict --model RUN_OR_SAVEDMODEL --input FILES_OR_DIR --output DIR

For each image, at the image's own size: `NAME_mask.png` (colour-coded classes), `NAME_overlay.png`
(the mask over the photo) and `NAME_panel.png` (image | prediction | ground truth with `--gt`).
With `--format cityscapes-labelids`, only `NAME_pred_labelIds.png` (NAME without `_leftImg8bit`):
full-resolution Cityscapes labelIds, named so that cityscapesScripts' evaluation
(`evalPixelLevelSemanticLabeling.py`, which takes any `{city}_{seq}_{frame}*.png`) finds exactly
one prediction per ground truth.

Each image is inferred by the model's inference contract (`keras_seg.contract`), as training
validated it, and predicted at its own resolution; `--inference`, `--tile`, `--overlap` change
the contract, `--flip` averages with the mirror image. JPEG EXIF orientation is applied, so what a
photo viewer shows is what gets segmented (the export's graph, like TensorFlow's decoders, ignores
it: clients send upright pixels). Images found in a directory keep their sub-folders under
`--output`.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import numpy as np

from keras_seg.evaluate import add_inference_arguments, check_inference_arguments, check_retired_flags, check_tile

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FORMATS = ("color", "cityscapes-labelids")
CITYSCAPES_IMAGE_SUFFIX = "_leftImg8bit"


class PredictError(ValueError):
    """A bad input or argument, said in one line."""


@dataclass
class Item:
    """One image to segment and where its outputs go."""

    path: str
    out_stem: str  # output path without the suffix (`_mask.png`, ...)
    gt_path: str | None = None
    gt_kind: str | None = None  # "index" (class indices) or "cityscapes_labelids" (raw labelIds)


def collect_images(inputs) -> list:
    """(path, relative output stem) for files given and images found (recursively) in directories, sorted."""
    found = []
    for given in inputs:
        if os.path.isdir(given):
            for root, dirs, files in os.walk(given):
                dirs.sort()
                for name in sorted(files):
                    if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."):
                        path = os.path.join(root, name)
                        found.append((path, os.path.splitext(os.path.relpath(path, given))[0]))
        elif os.path.isfile(given):
            found.append((given, os.path.splitext(os.path.basename(given))[0]))
        else:
            raise PredictError(f"--input {given}: no such file or directory")
    if not found:
        raise PredictError(f"--input {' '.join(inputs)}: no .png / .jpg / .jpeg images found")
    return found


def read_image(path) -> np.ndarray:
    """An image file -> RGB uint8 [H, W, 3], turned upright by its EXIF orientation (as photo viewers show it)."""
    import cv2

    try:
        data = np.fromfile(path, np.uint8)
    except OSError as err:
        raise PredictError(f"{path}: unreadable ({err.strerror})") from err
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise PredictError(f"{path}: not an image (or a corrupt one): expected a PNG or JPEG file")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def trainid_to_labelid() -> np.ndarray:
    """256-entry table: Cityscapes trainId -> labelId (255 -> 0, 'unlabeled')."""
    from keras_seg.labels import CITYSCAPES_LABELS

    table = np.zeros(256, np.uint8)
    for label in CITYSCAPES_LABELS:
        if 0 <= label.train_id < 255:
            table[label.train_id] = label.id
    return table


def labelid_table(segmenter) -> np.ndarray:
    """The class-index -> Cityscapes labelId table of a model, or a PredictError when it has none."""
    if segmenter.label_space == "trainid" and segmenter.num_classes == 19:
        return trainid_to_labelid()
    if segmenter.label_space == "labelid":
        return np.arange(256, dtype=np.uint8)
    raise PredictError(f"--format cityscapes-labelids needs a model of Cityscapes trainIds or labelIds; this one "
                       f"predicts {segmenter.num_classes} classes in the label space {segmenter.label_space!r}")


# --------------------------------------------------------------------------- ground truth


def ground_truth_names(stem: str, label_space) -> list:
    """File names that may hold an image's ground truth, in order of preference, with their kind."""
    names = [(f"{stem}.png", "index")]
    if stem.endswith(CITYSCAPES_IMAGE_SUFFIX):
        prefix = stem[: -len(CITYSCAPES_IMAGE_SUFFIX)]
        if label_space == "trainid":
            names.append((f"{prefix}_gtFine_labelTrainIds.png", "index"))
        if label_space in ("trainid", "category", "labelid"):
            names.append((f"{prefix}_gtFine_labelIds.png", "cityscapes_labelids"))
    return names


def find_ground_truth(items, gt_dir, label_space):
    """Fill in each item's `gt_path` and kind from `gt_dir` (searched recursively), or fail naming the missing."""
    if not os.path.isdir(gt_dir):
        raise PredictError(f"--gt {gt_dir}: no such directory")
    by_name = {}
    for root, _, files in os.walk(gt_dir):
        for name in files:
            by_name.setdefault(name, os.path.join(root, name))
    missing = []
    for item in items:
        stem = os.path.basename(os.path.splitext(item.path)[0])
        candidates = ground_truth_names(stem, label_space)
        match = next(((by_name[n], kind) for n, kind in candidates if n in by_name), None)
        if match is None:
            missing.append((item.path, [n for n, _ in candidates]))
        else:
            item.gt_path, item.gt_kind = match
    if missing:
        path, names = missing[0]
        raise PredictError(f"--gt {gt_dir}: no ground truth for {len(missing)} of {len(items)} images, e.g. {path} "
                           f"(looked for {' or '.join(names)})")


def read_ground_truth(item, label_space, image_shape) -> np.ndarray:
    """The item's mask as class indices of the model's label space (255 ignored)."""
    from PIL import Image

    from keras_seg.labels import cityscapes_label_space

    try:
        with Image.open(item.gt_path) as img:
            if img.mode in ("RGB", "RGBA"):
                raise PredictError(f"{item.gt_path}: a colour mask; --gt needs class-index PNGs "
                                   "(palette PNGs, labelTrainIds or labelIds)")
            values = np.array(img)
    except PredictError:
        raise
    except Exception as err:  # noqa: BLE001 - Pillow raises many kinds; the user needs the file named
        raise PredictError(f"{item.gt_path}: not a readable mask ({err})") from err
    if values.shape != tuple(image_shape[:2]):
        raise PredictError(f"{item.gt_path}: mask is {values.shape[1]}x{values.shape[0]}, its image "
                           f"{image_shape[1]}x{image_shape[0]}")
    values = values.astype(np.uint8)
    if item.gt_kind == "cityscapes_labelids":
        values = cityscapes_label_space(label_space).map_raw(values)
    return values


# --------------------------------------------------------------------------- outputs


def output_paths(item, output, image_format) -> list:
    base = os.path.join(output, item.out_stem)
    if image_format == "cityscapes-labelids":
        stem = base[: -len(CITYSCAPES_IMAGE_SUFFIX)] if base.endswith(CITYSCAPES_IMAGE_SUFFIX) else base
        return [f"{stem}_pred_labelIds.png"]
    return [f"{base}_mask.png", f"{base}_overlay.png", f"{base}_panel.png"]


def _scale_to_height(image, height, nearest):
    import cv2

    if not height or image.shape[0] <= height:
        return image
    width = max(1, round(image.shape[1] * height / image.shape[0]))
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)


def write_outputs(paths, image, class_ids, segmenter, image_format, gt=None, alpha=0.5, panel_height=512,
                  labelids=None):
    """Write one image's outputs (see the module docstring)."""
    from keras_seg import visualize

    for path in paths:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if image_format == "cityscapes-labelids":
        visualize.save_png_atomically(paths[0], labelids[class_ids])
        return
    colors = segmenter.colors
    mask = visualize.colorize(class_ids, colors)
    visualize.save_png_atomically(paths[0], mask)
    visualize.save_png_atomically(paths[1], visualize.overlay(image, class_ids, colors, alpha))
    columns = [_scale_to_height(image, panel_height, nearest=False), _scale_to_height(mask, panel_height, True)]
    if gt is not None:
        columns.append(_scale_to_height(visualize.colorize(gt, colors), panel_height, True))
    visualize.save_png_atomically(paths[2], visualize.panel(columns))


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_seg.predict",
        description="Segment images with a training run or an exported SavedModel: colour-coded masks, overlays "
                    "and image | prediction (| ground truth) panels, or Cityscapes labelId PNGs.",
    )
    parser.add_argument("--model", required=True, metavar="RUN_OR_SAVEDMODEL",
                        help="run directory (its best.keras), a .keras file in one, a keras_seg.export SavedModel, "
                             "or an exported .tflite, .onnx or OpenVINO .xml (run by its own runtime)")
    parser.add_argument("--input", required=True, nargs="+", metavar="FILE_OR_DIR",
                        help="image files, or directories searched recursively for .png / .jpg / .jpeg")
    parser.add_argument("--output", required=True, metavar="DIR", help="where the outputs go")
    parser.add_argument("--gt", metavar="DIR",
                        help="ground-truth masks for a third panel column: NAME.png (class indices, e.g. VOC palette "
                             "PNGs) or Cityscapes' *_gtFine_labelTrainIds.png / *_gtFine_labelIds.png, found "
                             "anywhere under DIR")
    parser.add_argument("--format", choices=FORMATS, default="color",
                        help="color: NAME_mask.png, NAME_overlay.png, NAME_panel.png; cityscapes-labelids: only "
                             "NAME_pred_labelIds.png, full-resolution labelIds for cityscapesScripts (default: color)")
    add_inference_arguments(parser)
    parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the mask in the overlay (default: 0.5)")
    parser.add_argument("--panel-height", type=int, default=512,
                        help="panels taller than this are scaled down (default: 512; 0: full size)")
    parser.add_argument("--overwrite", action="store_true", help="replace output files that exist")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip images that cannot be read (listed on stderr and counted at the end) instead of "
                             "stopping at the first")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def plan(args, segmenter, found) -> list:
    """The items to segment (`found` by `collect_images`), with their ground truth; fails before any work
    on a name clash or an existing file."""
    items = [Item(path, stem) for path, stem in found]
    if args.gt:
        find_ground_truth(items, args.gt, segmenter.label_space)
    seen, existing = {}, []
    for item in items:
        for path in output_paths(item, args.output, args.format):
            if path in seen:
                raise PredictError(f"{item.path} and {seen[path]} would both write {path}: give them separately "
                                   "or rename one")
            seen[path] = item.path
            if os.path.exists(path):
                existing.append(path)
    if existing and not args.overwrite:
        raise PredictError(f"{len(existing)} output files exist, e.g. {existing[0]}: --overwrite to replace them, "
                           "or choose another --output")
    return items


def main(argv=None) -> int:
    parser = build_parser()
    check_retired_flags(parser, argv)
    args = parser.parse_args(argv)
    check_inference_arguments(parser, args)
    check_tile(parser, args)
    if args.panel_height < 0 or not 0.0 <= args.alpha <= 1.0:
        parser.exit(2, "error: --panel-height must be >= 0 and --alpha in [0, 1]\n")
    from keras_seg.quiet import import_tensorflow

    import_tensorflow()
    from tqdm import tqdm

    from keras_seg import inference

    try:
        found = collect_images(args.input)  # a bad --input fails before the model loads
        segmenter = inference.load_segmenter(args.model, args.inference, args.tile, args.overlap)
        labelids = labelid_table(segmenter) if args.format == "cityscapes-labelids" else None
        items = plan(args, segmenter, found)
        skipped = []
        for item in tqdm(items, unit="img", desc="predict", disable=args.no_progress):
            try:
                image = read_image(item.path)
            except PredictError as err:
                if not args.skip_bad:
                    raise
                skipped.append(item.path)
                tqdm.write(f"skipped {err}", file=sys.stderr)
                continue
            gt = read_ground_truth(item, segmenter.label_space, image.shape) if item.gt_path else None
            prediction = segmenter.predict(image, args.flip)
            write_outputs(output_paths(item, args.output, args.format), image, prediction.class_ids, segmenter,
                          args.format, gt, args.alpha, args.panel_height, labelids)
    except (PredictError, inference.InferenceError, OSError) as err:
        parser.exit(2, f"error: {err}\n")
    written = len(items) - len(skipped)
    print(f"wrote the outputs of {written} image{'s' if written != 1 else ''} to {args.output}")
    if skipped:
        print(f"skipped {len(skipped)} unreadable image{'s' if len(skipped) != 1 else ''} (listed above on stderr)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
