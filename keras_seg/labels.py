"""Label spaces: class names, colours and the raw-id -> class-index lookup tables.

A *label space* says what the integers in a stored mask mean. Every mask written by
`tools/make_tfrecords.py` holds class indices `0 .. num_classes-1` and `IGNORE_INDEX` (255) for
pixels that take no part in training or evaluation.

The Cityscapes table follows cityscapesScripts' `helpers/labels.py` row for row (name, id, trainId,
category, categoryId, ignoreInEval, colour). This module imports only numpy, so that converter
worker processes start fast.
"""

from __future__ import annotations

import dataclasses
from collections import namedtuple

import numpy as np

IGNORE_INDEX = 255

CityscapesLabel = namedtuple(
    "CityscapesLabel", ["name", "id", "train_id", "category", "category_id", "ignore_in_eval", "color"]
)

# fmt: off
CITYSCAPES_LABELS = (
    #               name                    id  trainId  category        catId ignoreInEval color
    CityscapesLabel("unlabeled",             0, 255, "void",         0, True,  (0, 0, 0)),
    CityscapesLabel("ego vehicle",           1, 255, "void",         0, True,  (0, 0, 0)),
    CityscapesLabel("rectification border",  2, 255, "void",         0, True,  (0, 0, 0)),
    CityscapesLabel("out of roi",            3, 255, "void",         0, True,  (0, 0, 0)),
    CityscapesLabel("static",                4, 255, "void",         0, True,  (0, 0, 0)),
    CityscapesLabel("dynamic",               5, 255, "void",         0, True,  (111, 74, 0)),
    CityscapesLabel("ground",                6, 255, "void",         0, True,  (81, 0, 81)),
    CityscapesLabel("road",                  7,   0, "flat",         1, False, (128, 64, 128)),
    CityscapesLabel("sidewalk",              8,   1, "flat",         1, False, (244, 35, 232)),
    CityscapesLabel("parking",               9, 255, "flat",         1, True,  (250, 170, 160)),
    CityscapesLabel("rail track",           10, 255, "flat",         1, True,  (230, 150, 140)),
    CityscapesLabel("building",             11,   2, "construction", 2, False, (70, 70, 70)),
    CityscapesLabel("wall",                 12,   3, "construction", 2, False, (102, 102, 156)),
    CityscapesLabel("fence",                13,   4, "construction", 2, False, (190, 153, 153)),
    CityscapesLabel("guard rail",           14, 255, "construction", 2, True,  (180, 165, 180)),
    CityscapesLabel("bridge",               15, 255, "construction", 2, True,  (150, 100, 100)),
    CityscapesLabel("tunnel",               16, 255, "construction", 2, True,  (150, 120, 90)),
    CityscapesLabel("pole",                 17,   5, "object",       3, False, (153, 153, 153)),
    CityscapesLabel("polegroup",            18, 255, "object",       3, True,  (153, 153, 153)),
    CityscapesLabel("traffic light",        19,   6, "object",       3, False, (250, 170, 30)),
    CityscapesLabel("traffic sign",         20,   7, "object",       3, False, (220, 220, 0)),
    CityscapesLabel("vegetation",           21,   8, "nature",       4, False, (107, 142, 35)),
    CityscapesLabel("terrain",              22,   9, "nature",       4, False, (152, 251, 152)),
    CityscapesLabel("sky",                  23,  10, "sky",          5, False, (70, 130, 180)),
    CityscapesLabel("person",               24,  11, "human",        6, False, (220, 20, 60)),
    CityscapesLabel("rider",                25,  12, "human",        6, False, (255, 0, 0)),
    CityscapesLabel("car",                  26,  13, "vehicle",      7, False, (0, 0, 142)),
    CityscapesLabel("truck",                27,  14, "vehicle",      7, False, (0, 0, 70)),
    CityscapesLabel("bus",                  28,  15, "vehicle",      7, False, (0, 60, 100)),
    CityscapesLabel("caravan",              29, 255, "vehicle",      7, True,  (0, 0, 90)),
    CityscapesLabel("trailer",              30, 255, "vehicle",      7, True,  (0, 0, 110)),
    CityscapesLabel("train",                31,  16, "vehicle",      7, False, (0, 80, 100)),
    CityscapesLabel("motorcycle",           32,  17, "vehicle",      7, False, (0, 0, 230)),
    CityscapesLabel("bicycle",              33,  18, "vehicle",      7, False, (119, 11, 32)),
    CityscapesLabel("license plate",        -1,  -1, "vehicle",      7, True,  (0, 0, 142)),
)
# fmt: on

# The 7 evaluation categories, indexed 0..6 (catId - 1); "void" (catId 0) is ignored.
CITYSCAPES_CATEGORIES = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
# Colours used for the categories: the colour of the first trainable class of each category.
CITYSCAPES_CATEGORY_COLORS = (
    (128, 64, 128), (70, 70, 70), (153, 153, 153), (107, 142, 35), (70, 130, 180), (220, 20, 60), (0, 0, 142),
)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
VOC_VOID_COLOR = (224, 224, 192)


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved), `n` x 3 uint8; entry 255 is the void colour."""
    palette = np.zeros((n, 3), np.uint8)
    for index in range(n):
        c, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette[index] = (r, g, b)
    return palette


@dataclasses.dataclass(frozen=True)
class LabelSpace:
    """What the values of a stored mask mean.

    `raw_to_class` is a 256-entry lookup table from the values found in source masks to class
    indices (or IGNORE_INDEX); `raw_valid` marks which raw values may occur at all: a source mask
    holding any other value is rejected as outside the label space.
    """

    name: str
    class_names: tuple
    class_colors: tuple  # one (r, g, b) per class
    raw_to_class: np.ndarray = dataclasses.field(repr=False, compare=False)
    raw_valid: np.ndarray = dataclasses.field(repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def map_raw(self, raw: np.ndarray) -> np.ndarray:
        """Raw source values -> class indices; caller checks validity with `invalid_values`."""
        return self.raw_to_class[raw]

    def invalid_values(self, raw: np.ndarray) -> list:
        """The distinct values of `raw` that are not in this label space (empty when all are)."""
        present = np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
        return [int(v) for v in present if not self.raw_valid[v]]

    def to_json(self) -> dict:
        return {
            "label_space": self.name,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "class_colors": [list(c) for c in self.class_colors],
            "ignore_index": IGNORE_INDEX,
        }


def _lut(pairs, default=IGNORE_INDEX):
    table = np.full(256, default, np.uint8)
    valid = np.zeros(256, bool)
    for raw, cls in pairs:
        table[raw] = cls
        valid[raw] = True
    return table, valid


def cityscapes_label_space(name: str) -> LabelSpace:
    """`trainid` (19 classes), `category` (7) or `labelid` (34), from raw labelIds 0..33."""
    labels = [lab for lab in CITYSCAPES_LABELS if lab.id >= 0]
    if name == "trainid":
        trainable = sorted((lab for lab in labels if lab.train_id != 255), key=lambda lab: lab.train_id)
        table, valid = _lut((lab.id, lab.train_id) for lab in labels)
        return LabelSpace(
            "trainid", tuple(lab.name for lab in trainable), tuple(lab.color for lab in trainable), table, valid
        )
    if name == "category":
        # As the official category evaluation: void and the labels ignored in evaluation are ignored.
        table, valid = _lut(
            (lab.id, lab.category_id - 1 if lab.category_id > 0 and not lab.ignore_in_eval else IGNORE_INDEX)
            for lab in labels
        )
        return LabelSpace("category", CITYSCAPES_CATEGORIES, CITYSCAPES_CATEGORY_COLORS, table, valid)
    if name == "labelid":
        table, valid = _lut((lab.id, lab.id) for lab in labels)
        names, colors = tuple(lab.name for lab in labels), tuple(lab.color for lab in labels)
        return LabelSpace("labelid", names, colors, table, valid)
    raise ValueError(f"unknown Cityscapes label space {name!r}: choose trainid, category or labelid")


CITYSCAPES_LABEL_SPACES = ("trainid", "category", "labelid")


def trainid_to_category() -> np.ndarray:
    """256-entry table mapping a trainId (or 255) to its category index (or 255)."""
    table = np.full(256, IGNORE_INDEX, np.uint8)
    for lab in CITYSCAPES_LABELS:
        if 0 <= lab.train_id < 255:
            table[lab.train_id] = lab.category_id - 1
    return table


def indexed_label_space(name: str, class_names, class_colors=None) -> LabelSpace:
    """A label space whose raw mask values already are class indices (0..n-1) or 255."""
    n = len(class_names)
    if not 1 <= n <= 255:
        raise ValueError(f"a label space needs 1..255 classes, got {n}")
    if class_colors is None:
        class_colors = [tuple(int(v) for v in c) for c in voc_palette(n)]
    table, valid = _lut([(i, i) for i in range(n)] + [(IGNORE_INDEX, IGNORE_INDEX)])
    return LabelSpace(name, tuple(class_names), tuple(tuple(c) for c in class_colors), table, valid)


def voc_label_space() -> LabelSpace:
    return indexed_label_space("voc", VOC_CLASSES, [tuple(int(v) for v in c) for c in voc_palette(21)])


def cityscapes_color_table(label_space: str = "trainid"):
    """Every Cityscapes label colour -> class index of `label_space` (trainid or category).

    Several labels share a colour (pole/polegroup, car/license plate, the voids): a colour maps to
    a trainable class when any label of that colour has one, else to IGNORE_INDEX.
    Returns (colors uint8 [K, 3], classes uint8 [K]).
    """
    to_category = trainid_to_category()
    by_color = {}
    for lab in CITYSCAPES_LABELS:
        train_id = lab.train_id if lab.train_id >= 0 else IGNORE_INDEX
        cls = train_id if label_space == "trainid" else int(to_category[train_id])
        if by_color.get(lab.color, IGNORE_INDEX) == IGNORE_INDEX:
            by_color[lab.color] = cls
    colors = np.array(list(by_color.keys()), np.uint8)
    classes = np.array(list(by_color.values()), np.uint8)
    return colors, classes
