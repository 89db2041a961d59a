"""Cityscapes in its official layout.

    ROOT/leftImg8bit/{split}/{city}/{frame}_leftImg8bit.png
    ROOT/gtFine/{split}/{city}/{frame}_gtFine_labelIds.png

Masks are read from the raw `_labelIds.png` and mapped through cityscapesScripts' label table to
the chosen label space (`trainid`, `category` or `labelid`; see `keras_seg.labels`).
"""

from __future__ import annotations

import os

from keras_seg.labels import cityscapes_label_space
from pipelines.common import ConversionError, Sample, load_image_file, map_to_label_space, read_mask_values

IMAGE_SUFFIX = "_leftImg8bit.png"
MASK_SUFFIX = "_gtFine_labelIds.png"


class CityscapesSource:
    name = "cityscapes"

    def __init__(self, root: str, label_space: str = "trainid"):
        self.root = root
        self.label_space = cityscapes_label_space(label_space)
        self.image_root = os.path.join(root, "leftImg8bit")
        self.mask_root = os.path.join(root, "gtFine")
        if not os.path.isdir(self.image_root):
            hint = " (pass the folder that contains it)" if os.path.basename(os.path.normpath(root)) in (
                "leftImg8bit", "gtFine") else ""
            raise ConversionError(
                root, "no leftImg8bit/ folder: expected the official layout "
                f"leftImg8bit/{{split}}/{{city}}/*{IMAGE_SUFFIX} with gtFine/ beside it{hint}"
            )

    def list_splits(self):
        return sorted(d for d in os.listdir(self.image_root) if os.path.isdir(os.path.join(self.image_root, d)))

    def list_samples(self, split):
        image_dir = os.path.join(self.image_root, split)
        mask_dir = os.path.join(self.mask_root, split)
        if not os.path.isdir(mask_dir):
            raise ConversionError(mask_dir, f"missing: split '{split}' has images but no gtFine masks")
        samples, frames = [], set()
        for city in sorted(os.listdir(image_dir)):
            for name in sorted(os.listdir(os.path.join(image_dir, city))):
                if not name.endswith(IMAGE_SUFFIX):
                    continue
                frame = name[: -len(IMAGE_SUFFIX)]
                frames.add((city, frame))
                image_path = os.path.join(image_dir, city, name)
                mask_path = os.path.join(mask_dir, city, frame + MASK_SUFFIX)
                if not os.path.exists(mask_path):
                    raise ConversionError(image_path, f"image has no mask (expected {mask_path})")
                samples.append(Sample(os.path.relpath(image_path, self.root), image_path, mask_path))
        for city in sorted(os.listdir(mask_dir)):
            city_dir = os.path.join(mask_dir, city)
            for name in sorted(os.listdir(city_dir)) if os.path.isdir(city_dir) else []:
                if name.endswith(MASK_SUFFIX) and (city, name[: -len(MASK_SUFFIX)]) not in frames:
                    raise ConversionError(os.path.join(city_dir, name), "mask has no image in leftImg8bit/")
        return samples

    def load(self, sample):
        loaded = load_image_file(sample.image_path)
        loaded.mask = map_to_label_space(read_mask_values(sample.mask_path), self.label_space, sample.mask_path)
        return loaded
