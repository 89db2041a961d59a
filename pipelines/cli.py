"""Command line of tools/make_tfrecords.py (also installed as `keras-seg-make-tfrecords`)."""

from __future__ import annotations

import argparse
import os
import re
import sys

SOURCES = ("cityscapes", "voc", "cityscapes-pairs", "folder", "tfds")


def _size(text):
    match = re.fullmatch(r"(\d+)[xX](\d+)", text)
    if not match or 0 in (int(match[1]), int(match[2])):
        raise argparse.ArgumentTypeError(f"expected HxW such as 512x1024, got {text!r}")
    return int(match[1]), int(match[2])


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    io = common.add_argument_group("input and output")
    io.add_argument("--input", help="the dataset folder as downloaded (not used by tfds)")
    io.add_argument("--output", required=True, help="folder for the shards and dataset_info.json")
    io.add_argument("--split", nargs="+", metavar="NAME", help="splits to convert (default: every split found)")
    io.add_argument("--label-space", help="what the stored class indices mean (per source; see --help of each)")
    io.add_argument("--val-fraction", type=float, metavar="F",
                    help="for sources without a val split: move the last F of the sorted train list into 'val'")
    io.add_argument("--overwrite", action="store_true", help="replace splits that the output already holds")
    io.add_argument("--skip-bad", action="store_true", help="skip (and report) bad files instead of stopping")
    store = common.add_argument_group("storage")
    store.add_argument("--num-shards", type=_positive_int, help="shards per split (default: by --shard-size-mb)")
    store.add_argument("--shard-size-mb", type=float, default=32.0, help="target shard size in MiB (default 32)")
    resize = store.add_mutually_exclusive_group()
    resize.add_argument("--max-size", type=_positive_int, metavar="N", help="shrink so the longer side is at most N")
    resize.add_argument("--size", type=_size, metavar="HxW", help="resize every image and mask to HxW")
    store.add_argument("--image-format", choices=("keep", "jpeg", "png"), default="keep",
                       help="keep the original bytes when not resized (default), or re-encode")
    store.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality when encoding JPEG (default 95)")
    store.add_argument("--shuffle-seed", type=int, help="shuffle the examples of each split with this seed")
    run = common.add_argument_group("running")
    run.add_argument("--workers", type=_positive_int, default=os.cpu_count() or 1,
                     help="processes (default: all cores)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    parser = argparse.ArgumentParser(
        prog="make_tfrecords.py",
        description="Convert a segmentation dataset, as downloaded, into sharded TFRecords + dataset_info.json.",
    )
    sub = parser.add_subparsers(dest="source", required=True, metavar="{" + ",".join(SOURCES + ("index",)) + "}")
    sub.add_parser("cityscapes", parents=[common], help="official leftImg8bit/ + gtFine/ layout",
                   description="Cityscapes official layout; --label-space trainid (default, 19 classes), "
                               "category (7) or labelid (34).")
    voc = sub.add_parser("voc", parents=[common], help="VOCdevkit/VOC2012", description="PASCAL VOC 2012, 21 classes.")
    voc.add_argument("--voc-masks", default="SegmentationClass", choices=("SegmentationClass", "SegmentationClassAug"),
                     help="mask folder (default SegmentationClass)")
    pairs = sub.add_parser("cityscapes-pairs", parents=[common], help="Kaggle side-by-side photo|colour-mask JPEGs",
                           description="Kaggle / pix2pix cityscapes_data pairs; --label-space trainid or category.")
    pairs.add_argument("--max-color-distance", type=float, default=40.0,
                       help="pixels farther than this (RGB) from every label colour become 255 (default 40)")
    folder = sub.add_parser("folder", parents=[common], help="images/ + masks/, or suffix-paired files",
                            description="Plain image/mask folders (see the README for the class file format).")
    folder.add_argument("--image-suffix", help="pair NAME{image-suffix}.* with NAME{mask-suffix}.* in one folder")
    folder.add_argument("--mask-suffix")
    folder.add_argument("--palette", help="colour masks: voc, cityscapes, or a class file with colours")
    folder.add_argument("--classes", help="class file: one 'name [R G B]' per line")
    folder.add_argument("--num-classes", type=_positive_int, help="index masks without a class file")
    tfds = sub.add_parser("tfds", parents=[common], help="a TensorFlow Datasets builder",
                          description="A TFDS builder with an image and a segmentation mask.")
    tfds.add_argument("--tfds-name", required=True, help="e.g. cityscapes/semantic_segmentation")
    tfds.add_argument("--image-key", help="image feature (default image_left for cityscapes, else image)")
    tfds.add_argument("--mask-key", help="mask feature (default segmentation_label for cityscapes, else "
                                         "segmentation_mask)")
    tfds.add_argument("--data-dir", help="TFDS data_dir")
    tfds.add_argument("--manual-dir", help="TFDS manual_dir (where manually downloaded archives are)")
    tfds.add_argument("--classes", help="class file, for non-Cityscapes builders")
    tfds.add_argument("--num-classes", type=_positive_int, help="class count, for non-Cityscapes builders")
    index = sub.add_parser("index", help="add the class index to a folder converted without one",
                           description="Write {split}-class-index.npz (which classes each record holds, and where, "
                                       "on an 8x8 grid: what --class-uniform sampling reads) from the shards of a "
                                       "folder converted by an earlier tools/make_tfrecords.py, and record it in its "
                                       "dataset_info.json. The shards are read, not changed.")
    index.add_argument("--data", required=True, help="the converted folder (with dataset_info.json)")
    index.add_argument("--split", nargs="+", metavar="NAME", help="splits to index (default: every split)")
    return parser


def make_source(args):
    """The source reader for the parsed arguments."""
    if args.source != "tfds":
        if not args.input:
            raise _UsageError(f"{args.source} needs --input DIR")
        if not os.path.isdir(args.input):
            from pipelines.common import ConversionError

            raise ConversionError(args.input, "no such folder")
    if args.source == "cityscapes":
        from pipelines.cityscapes import CityscapesSource

        return CityscapesSource(args.input, args.label_space or "trainid")
    if args.source == "voc":
        from pipelines.voc import VocSource

        return VocSource(args.input, args.label_space or "voc", args.voc_masks)
    if args.source == "cityscapes-pairs":
        from pipelines.cityscapes_pairs import CityscapesPairsSource

        return CityscapesPairsSource(args.input, args.label_space or "trainid", args.max_color_distance)
    if args.source == "folder":
        from pipelines.folder import FolderSource

        if args.label_space:
            raise _UsageError("folder takes its classes from --classes / --palette / --num-classes, not --label-space")
        return FolderSource(args.input, args.classes, args.palette, args.num_classes, args.image_suffix,
                            args.mask_suffix)
    from pipelines.tfds_source import TfdsSource

    return TfdsSource(args.tfds_name, args.label_space, args.image_key, args.mask_key, args.data_dir,
                      args.manual_dir, args.classes, args.num_classes, args.split)


class _UsageError(Exception):
    """A bad combination of arguments, reported by argparse as usage."""


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.source == "index":
        return _index(args)
    from pipelines.common import ConversionError
    from pipelines.convert import EncodeOptions, convert

    if not 1 <= args.jpeg_quality <= 100:
        parser.error(f"--jpeg-quality must be 1..100, got {args.jpeg_quality}")
    try:
        source = make_source(args)
        convert(
            source,
            args.output,
            args.split,
            val_fraction=args.val_fraction,
            workers=args.workers,
            num_shards=args.num_shards,
            shard_bytes=int(args.shard_size_mb * 1024 * 1024),
            options=EncodeOptions(args.size, args.max_size, args.image_format, args.jpeg_quality),
            overwrite=args.overwrite,
            skip_bad=args.skip_bad,
            shuffle_seed=args.shuffle_seed,
            progress=not args.no_progress,
            log=lambda line: print(line, file=sys.stderr),
        )
    except _UsageError as err:
        parser.error(str(err))
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    print(f"wrote {os.path.join(args.output, 'dataset_info.json')}", file=sys.stderr)
    return 0


def _index(args) -> int:
    from keras_seg import tfrecord
    from pipelines.class_index import add_class_index

    try:
        add_class_index(args.data, args.split, log=lambda line: print(line, file=sys.stderr))
    except tfrecord.DatasetFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: dataset_info.json unchanged", file=sys.stderr)
        return 130
    print(f"wrote {os.path.join(args.data, tfrecord.DATASET_INFO_NAME)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
