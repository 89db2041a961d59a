"""PASCAL VOC 2012 segmentation in its official layout.

    VOCdevkit/VOC2012/JPEGImages/{id}.jpg
    VOCdevkit/VOC2012/SegmentationClass/{id}.png      palette PNG: the palette *indices* are the classes
    VOCdevkit/VOC2012/SegmentationClassAug/{id}.png   (SBD-style, optional) grayscale class indices
    VOCdevkit/VOC2012/ImageSets/Segmentation/{split}.txt

21 classes (background + 20), 255 = void (the object borders).
"""

from __future__ import annotations

import os

from keras_seg.labels import voc_label_space
from pipelines.common import ConversionError, Sample, load_image_file, map_to_label_space, read_mask_values

MASK_FOLDERS = ("SegmentationClass", "SegmentationClassAug")


def find_voc_root(path: str) -> str:
    """Accepts VOC2012/, VOCdevkit/ or the folder holding VOCdevkit/."""
    for candidate in (path, os.path.join(path, "VOC2012"), os.path.join(path, "VOCdevkit", "VOC2012")):
        if os.path.isdir(os.path.join(candidate, "JPEGImages")) and os.path.isdir(
            os.path.join(candidate, "ImageSets", "Segmentation")
        ):
            return candidate
    raise ConversionError(
        path, "not a VOC folder: expected VOCdevkit/VOC2012 with JPEGImages/ and ImageSets/Segmentation/"
    )


class VocSource:
    name = "voc"

    def __init__(self, root: str, label_space: str = "voc", mask_folder: str = "SegmentationClass"):
        if label_space != "voc":
            raise ConversionError("--label-space", f"VOC has one label space, 'voc'; got {label_space!r}")
        if mask_folder not in MASK_FOLDERS:
            raise ConversionError("--voc-masks", f"must be one of {MASK_FOLDERS}, got {mask_folder!r}")
        self.root = find_voc_root(root)
        self.label_space = voc_label_space()
        self.mask_dir = os.path.join(self.root, mask_folder)
        if not os.path.isdir(self.mask_dir):
            raise ConversionError(self.mask_dir, "missing: no segmentation masks in this VOC folder")
        self.sets_dir = os.path.join(self.root, "ImageSets", "Segmentation")

    def list_splits(self):
        return sorted(n[:-4] for n in os.listdir(self.sets_dir) if n.endswith(".txt"))

    def list_samples(self, split):
        list_path = os.path.join(self.sets_dir, f"{split}.txt")
        with open(list_path) as f:
            ids = [line.split()[0] for line in f if line.strip()]
        samples = []
        for image_id in ids:
            image_path = os.path.join(self.root, "JPEGImages", f"{image_id}.jpg")
            mask_path = os.path.join(self.mask_dir, f"{image_id}.png")
            if not os.path.exists(image_path):
                raise ConversionError(image_path, f"listed in {list_path} but the image is missing")
            if not os.path.exists(mask_path):
                raise ConversionError(image_path, f"image has no mask (expected {mask_path})")
            samples.append(Sample(os.path.relpath(image_path, self.root), image_path, mask_path))
        return samples

    def load(self, sample):
        loaded = load_image_file(sample.image_path)
        loaded.mask = map_to_label_space(read_mask_values(sample.mask_path), self.label_space, sample.mask_path)
        return loaded
