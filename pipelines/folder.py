"""Plain folders of images and masks.

Two pairings, each either at ROOT (one split, called `train`) or under ROOT/{split}/:
- subfolders: `images/NAME.jpg` with `masks/NAME.png` (paired by file stem);
- suffixes, in one folder: `NAME{image_suffix}.ext` with `NAME{mask_suffix}.ext`
  (e.g. `--image-suffix _image --mask-suffix _target`).

Masks are index PNGs (values = class indices, 255 = ignore; palette PNGs give their indices), or
colour PNGs mapped exactly through `--palette voc|cityscapes|FILE`. Classes come from
`--classes FILE`, a palette, or `--num-classes N`.

Class / palette file: one class per line in index order, `name [R G B]`; `#` starts a comment;
a line named `ignore` or `void` gives the colour of ignored pixels (255) instead of a class.
"""

from __future__ import annotations

import os

import numpy as np

from keras_seg.labels import (
    IGNORE_INDEX, VOC_CLASSES, VOC_VOID_COLOR, cityscapes_color_table, cityscapes_label_space,
    indexed_label_space, voc_palette,
)
from pipelines.common import (
    ConversionError, Sample, list_images, load_image_file, map_colors_exact, map_to_label_space, read_color_mask,
    natural_key, read_mask_values,
)

IGNORE_NAMES = ("ignore", "void")


def read_class_file(path: str):
    """-> (names, colours or None, ignore colours) from a class / palette file."""
    names, colors, ignore_colors = [], [], []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise ConversionError(path, f"cannot read the class file ({err.strerror or err})") from err
    for number, line in enumerate(lines, 1):
        tokens = line.split("#", 1)[0].split()
        if not tokens:
            continue
        color = None
        if len(tokens) >= 4 and all(t.isdigit() for t in tokens[-3:]):
            color = tuple(int(t) for t in tokens[-3:])
            tokens = tokens[:-3]
            if max(color) > 255:
                raise ConversionError(f"{path}:{number}", f"colour {color} has a component above 255")
        name = " ".join(tokens)
        if name.lower() in IGNORE_NAMES:
            if color is None:
                raise ConversionError(f"{path}:{number}", f"'{name}' needs a colour (R G B)")
            ignore_colors.append(color)
            continue
        names.append(name)
        colors.append(color)
    if not names:
        raise ConversionError(path, "no classes in the class file")
    if any(c is None for c in colors):
        colors = None if all(c is None for c in colors) else colors
        if colors is not None:
            raise ConversionError(path, "give a colour on every line or on none")
    return names, colors, ignore_colors


def build_folder_label_space(classes=None, palette=None, num_classes=None):
    """-> (LabelSpace, colour table (colours, classes) or None for index masks)."""
    if palette == "voc":
        space = indexed_label_space("voc", VOC_CLASSES, [tuple(int(v) for v in c) for c in voc_palette(21)])
        colors = np.concatenate([voc_palette(21), np.array([VOC_VOID_COLOR], np.uint8)])
        classes_of_colors = np.array(list(range(21)) + [IGNORE_INDEX], np.uint8)
        table = (colors, classes_of_colors)
    elif palette == "cityscapes":
        space = cityscapes_label_space("trainid")
        table = cityscapes_color_table("trainid")
    elif palette:
        names, colors, ignore_colors = read_class_file(palette)
        if colors is None:
            raise ConversionError(palette, "a palette file needs a colour (R G B) on every line")
        space = indexed_label_space("custom", names, colors)
        table = (
            np.array(colors + ignore_colors, np.uint8),
            np.array(list(range(len(names))) + [IGNORE_INDEX] * len(ignore_colors), np.uint8),
        )
    else:
        table = None
        space = None
    if classes:
        names, colors, _ = read_class_file(classes)
        if space is not None and len(names) != space.num_classes:
            raise ConversionError(classes, f"lists {len(names)} classes but the palette has {space.num_classes}")
        space = indexed_label_space("custom", names, colors or (space.class_colors if space else None))
    elif space is None:
        if not num_classes:
            raise ConversionError(
                "folder", "say what the mask values mean: --classes FILE, --palette voc|cityscapes|FILE, "
                "or --num-classes N"
            )
        space = indexed_label_space("custom", [f"class_{i}" for i in range(num_classes)])
    if palette is None and space.name == "custom" and num_classes and num_classes != space.num_classes:
        raise ConversionError("--num-classes", f"{num_classes} disagrees with the {space.num_classes} classes given")
    return space, table


class FolderSource:
    name = "folder"

    def __init__(self, root, classes=None, palette=None, num_classes=None, image_suffix=None, mask_suffix=None):
        if not os.path.isdir(root):
            raise ConversionError(root, "no such folder")
        if (image_suffix is None) != (mask_suffix is None):
            raise ConversionError("folder", "--image-suffix and --mask-suffix go together")
        self.root = root
        self.image_suffix, self.mask_suffix = image_suffix, mask_suffix
        self.label_space, self.color_table = build_folder_label_space(classes, palette, num_classes)
        if self._holds_pairs(root):
            self.split_dirs = {"train": root}
        else:
            self.split_dirs = {
                d: os.path.join(root, d) for d in sorted(os.listdir(root)) if self._holds_pairs(os.path.join(root, d))
            }
        if not self.split_dirs:
            layout = (f"files NAME{image_suffix}.* with NAME{mask_suffix}.*" if image_suffix is not None
                      else "images/ and masks/ subfolders")
            raise ConversionError(root, f"found no {layout}, here or in split subfolders")

    def _holds_pairs(self, directory):
        if not os.path.isdir(directory):
            return False
        if self.image_suffix is None:
            return os.path.isdir(os.path.join(directory, "images")) and os.path.isdir(os.path.join(directory, "masks"))
        return any(os.path.splitext(n)[0].endswith(self.image_suffix) for n in list_images(directory))

    def list_splits(self):
        return list(self.split_dirs)

    def list_samples(self, split):
        directory = self.split_dirs[split]
        if self.image_suffix is None:
            image_dir, mask_dir = os.path.join(directory, "images"), os.path.join(directory, "masks")
            images = {os.path.splitext(n)[0]: n for n in list_images(image_dir)}
            masks = {os.path.splitext(n)[0]: n for n in list_images(mask_dir)}
        else:
            image_dir = mask_dir = directory
            images, masks = {}, {}
            for n in list_images(directory):
                stem = os.path.splitext(n)[0]
                if stem.endswith(self.image_suffix):
                    images[stem[: len(stem) - len(self.image_suffix)]] = n
                elif stem.endswith(self.mask_suffix):
                    masks[stem[: len(stem) - len(self.mask_suffix)]] = n
        for key in sorted(set(masks) - set(images)):
            raise ConversionError(os.path.join(mask_dir, masks[key]), "mask has no image")
        samples = []
        for key in sorted(images, key=natural_key):
            image_path = os.path.join(image_dir, images[key])
            if key not in masks:
                raise ConversionError(image_path, "image has no mask")
            mask_path = os.path.join(mask_dir, masks[key])
            samples.append(Sample(os.path.relpath(image_path, self.root), image_path, mask_path))
        return samples

    def load(self, sample):
        loaded = load_image_file(sample.image_path)
        if self.color_table is None:
            loaded.mask = map_to_label_space(read_mask_values(sample.mask_path), self.label_space, sample.mask_path)
        else:
            loaded.mask = map_colors_exact(read_color_mask(sample.mask_path), *self.color_table, sample.mask_path)
        return loaded
