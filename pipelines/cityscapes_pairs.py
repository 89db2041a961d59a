"""The Kaggle / pix2pix "cityscapes_data" format: side-by-side JPEGs.

    ROOT/{train,val}/{N}.jpg     photo (left half) | colour-coded mask (right half)

The mask half is a JPEG-compressed rendering in the Cityscapes label colours. Each pixel takes
the class of the nearest label colour (every Cityscapes colour, void colours mapping to 255);
pixels farther than `max_color_distance` (RGB Euclidean) from every colour are JPEG noise at
object borders and become 255. Files are ordered numerically (N-th file = N-th official frame).
"""

from __future__ import annotations

import os

import cv2

from keras_seg.labels import cityscapes_color_table, cityscapes_label_space
from pipelines.common import ConversionError, Loaded, Sample, list_images, map_colors_nearest, nearest_color_lut

DEFAULT_MAX_COLOR_DISTANCE = 40.0


class CityscapesPairsSource:
    name = "cityscapes-pairs"

    def __init__(self, root: str, label_space: str = "trainid", max_color_distance=DEFAULT_MAX_COLOR_DISTANCE):
        if label_space not in ("trainid", "category"):
            raise ConversionError(
                "--label-space", f"cityscapes-pairs supports trainid or category (colours cannot tell the raw "
                f"labelIds apart), got {label_space!r}"
            )
        self.root = root
        self.label_space = cityscapes_label_space(label_space)
        self.colors, self.classes = cityscapes_color_table(label_space)
        self.max_color_distance = float(max_color_distance)
        if not self.list_splits():
            raise ConversionError(root, "no split folders with side-by-side JPEGs (expected train/1.jpg, ...)")

    def list_splits(self):
        if not os.path.isdir(self.root):
            raise ConversionError(self.root, "no such folder")
        return sorted(
            d for d in os.listdir(self.root)
            if os.path.isdir(os.path.join(self.root, d)) and list_images(os.path.join(self.root, d))
        )

    def list_samples(self, split):
        directory = os.path.join(self.root, split)
        return [
            Sample(os.path.join(split, name), os.path.join(directory, name))
            for name in list_images(directory)
        ]

    def prepare(self):
        """Builds the 16 MiB colour table before the workers fork, so that they share one copy."""
        nearest_color_lut(self.colors, self.classes, self.max_color_distance)

    def load(self, sample):
        pair = cv2.imread(sample.image_path, cv2.IMREAD_COLOR)
        if pair is None:
            raise ConversionError(sample.image_path, "not a readable image")
        height, width = pair.shape[:2]
        if width % 2:
            raise ConversionError(sample.image_path, f"width {width} is odd: not a side-by-side photo | mask pair")
        half = width // 2
        photo = cv2.cvtColor(pair[:, :half], cv2.COLOR_BGR2RGB)
        colors = cv2.cvtColor(pair[:, half:], cv2.COLOR_BGR2RGB)
        mask, far = map_colors_nearest(colors, self.colors, self.classes, self.max_color_distance)
        return Loaded(mask=mask, image=photo, image_format="jpeg", stats={"color_unmatched_pixels": far})
