"""What every source reader shares: the sample reference, the per-file error, image and mask I/O.

A source reader (one module per format) lists `Sample`s per split and loads one sample into an
image and a class-index mask. Readers run in worker processes, so they import numpy, OpenCV and
Pillow only, never TensorFlow, and a `Sample` holds paths rather than pixels.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

import cv2
import numpy as np
from PIL import Image

from keras_seg.labels import IGNORE_INDEX, LabelSpace

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ConversionError(Exception):
    """A problem with the input, reported to the user as one line: `where: what`."""

    def __init__(self, where, problem):
        super().__init__(f"{where}: {problem}")
        self.where, self.problem = str(where), problem


@dataclasses.dataclass(frozen=True)
class Sample:
    """One image/mask pair to convert.

    `name` is stored as `image/filename` (the image path relative to the source root);
    `payload` carries in-memory data for sources that have no files (TFDS).
    """

    name: str
    image_path: str | None = None
    mask_path: str | None = None
    payload: object = None

    @property
    def size_on_disk(self) -> int:
        return sum(os.path.getsize(p) for p in (self.image_path, self.mask_path) if p)


@dataclasses.dataclass
class Loaded:
    """A loaded sample: the image as file bytes (`image_bytes` + `image_format`) or RGB pixels
    (`image`), and the mask already mapped to class indices. `stats` are counts a source reports
    (summed over the split into dataset_info.json)."""

    mask: np.ndarray
    image: np.ndarray | None = None
    image_bytes: bytes | None = None
    image_format: str | None = None
    stats: dict = dataclasses.field(default_factory=dict)


def natural_key(text: str):
    """Sort key treating digit runs as numbers: 2.jpg before 10.jpg."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise ConversionError(path, f"cannot read ({err.strerror or err})") from err


def sniff_format(data: bytes) -> str | None:
    """'png' / 'jpeg' from the file signature, None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    return None


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 [H, W, 3] (grey and alpha images are converted)."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise ConversionError(where, "not a readable image (corrupt, truncated or of an unknown format)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def load_image_file(path: str) -> Loaded:
    """Reads an image file as bytes (kept as they are when JPEG/PNG) — the mask is filled in later."""
    data = read_bytes(path)
    return Loaded(mask=None, image_bytes=data, image_format=sniff_format(data))


def read_mask_values(path: str) -> np.ndarray:
    """A 1-channel mask PNG -> its raw values, uint8 [H, W].

    Palette PNGs (VOC's SegmentationClass) give their palette *indices*, not colours.
    Colour masks are rejected here: they need a palette (`read_color_mask`).
    """
    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode in ("RGB", "RGBA"):
                raise ConversionError(path, f"is a colour ({mode}) mask; pass --palette to map colours to classes")
            values = np.array(img)
    except ConversionError:
        raise
    except FileNotFoundError as err:
        raise ConversionError(path, "mask file not found") from err
    except Exception as err:  # noqa: BLE001 - Pillow raises many kinds; the user needs the file named
        raise ConversionError(path, f"not a readable mask image ({err})") from err
    if values.ndim != 2:
        raise ConversionError(path, f"mask has {values.shape[-1]} channels; expected a 1-channel PNG")
    if values.dtype != np.uint8:
        if values.size and (values.min() < 0 or values.max() > 255):
            raise ConversionError(path, f"mask values range {values.min()}..{values.max()}; expected 0..255")
        values = values.astype(np.uint8)
    return values


def read_color_mask(path: str) -> np.ndarray:
    """A colour mask -> RGB uint8 [H, W, 3]."""
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))
    except FileNotFoundError as err:
        raise ConversionError(path, "mask file not found") from err
    except Exception as err:  # noqa: BLE001
        raise ConversionError(path, f"not a readable mask image ({err})") from err


def map_to_label_space(raw: np.ndarray, label_space: LabelSpace, where: str) -> np.ndarray:
    """Raw mask values -> class indices, rejecting values outside the label space."""
    bad = label_space.invalid_values(raw)
    if bad:
        shown = ", ".join(map(str, bad[:8])) + (" ..." if len(bad) > 8 else "")
        raise ConversionError(where, f"mask holds values outside the '{label_space.name}' label space: {shown}")
    return label_space.map_raw(raw)


def map_colors_exact(rgb: np.ndarray, colors: np.ndarray, classes: np.ndarray, where: str) -> np.ndarray:
    """Lossless colour mask -> class indices by exact colour match; an unknown colour is an error."""
    keys = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    table_keys = (colors[:, 0].astype(np.int32) << 16) | (colors[:, 1].astype(np.int32) << 8) | colors[:, 2]
    order = np.argsort(table_keys)
    pos = np.clip(np.searchsorted(table_keys[order], keys), 0, len(order) - 1)
    found = table_keys[order][pos] == keys
    if not found.all():
        unknown = keys[~found]
        first = int(unknown[0])
        raise ConversionError(
            where,
            f"{unknown.size} pixels have colours not in the palette, e.g. "
            f"({first >> 16}, {(first >> 8) & 255}, {first & 255})",
        )
    return classes[order][pos].astype(np.uint8)


_FAR = 254  # marks "farther than the limit" inside the lookup table; stored as IGNORE_INDEX


def nearest_color_lut(colors: np.ndarray, classes: np.ndarray, max_distance: float) -> np.ndarray:
    """The look-up table `map_colors_nearest` uses (cached: built once per process)."""
    if (classes == _FAR).any():
        raise ValueError(f"class index {_FAR} is reserved")
    return _nearest_color_lut(colors.tobytes(), classes.astype(np.uint8).tobytes(), float(max_distance))


@functools.lru_cache(maxsize=4)
def _nearest_color_lut(colors_bytes: bytes, classes_bytes: bytes, max_distance: float) -> np.ndarray:
    """Class of the nearest palette colour for each of the 2^24 RGB colours (16 MiB, built once
    per process), so that each mask costs one table look-up per pixel.

    Only colours within `max_distance` of a palette colour get a class, so the table is filled
    by visiting the cube around each palette colour rather than all 2^24 x K distances; ties go
    to the earlier palette colour, as an argmin would.
    """
    palette = np.frombuffer(colors_bytes, np.uint8).reshape(-1, 3).astype(np.int32)
    classes = np.frombuffer(classes_bytes, np.uint8)
    limit2 = max_distance * max_distance
    radius = int(np.floor(max_distance))
    lut = np.full(1 << 24, _FAR, np.uint8)
    # Squared distances within the usual limits (< 255) fit in uint16: half the memory of int32 to
    # fill and look up, which halves the build time.
    dtype = np.uint16 if limit2 < np.iinfo(np.uint16).max else np.int32
    best = np.full(1 << 24, np.iinfo(dtype).max, dtype)
    for color, cls in zip(palette, classes):
        axes = [np.arange(max(0, v - radius), min(255, v + radius) + 1, dtype=np.int32) for v in color]
        r, g, b = np.meshgrid(*axes, indexing="ij", sparse=True)
        dist2 = (r - color[0]) ** 2 + (g - color[1]) ** 2 + (b - color[2]) ** 2
        near = dist2 <= limit2
        keys = np.broadcast_to((r << 16) | (g << 8) | b, near.shape)[near]
        dist2 = dist2[near].astype(dtype)
        closer = dist2 < best[keys]
        keys = keys[closer]
        best[keys] = dist2[closer]
        lut[keys] = cls
    return lut


def map_colors_nearest(rgb: np.ndarray, colors: np.ndarray, classes: np.ndarray, max_distance: float):
    """Lossy (JPEG) colour mask -> class indices by nearest palette colour.

    Pixels farther than `max_distance` (RGB Euclidean) from every colour become IGNORE_INDEX.
    Returns (mask uint8 [H, W], number of pixels ignored for distance).
    """
    lut = nearest_color_lut(colors, classes, max_distance)
    # The table's key R << 16 | G << 8 | B is a BGRA pixel read as one little-endian uint32, alpha
    # masked off: one conversion and one AND instead of three int32 copies and shifts (2x faster).
    bgra = cv2.cvtColor(np.ascontiguousarray(rgb, np.uint8), cv2.COLOR_RGB2BGRA)
    keys = bgra.view("<u4")[..., 0] & 0xFFFFFF
    mask = lut[keys]
    far = mask == _FAR
    mask[far] = IGNORE_INDEX
    return mask, int(far.sum())


def list_images(directory: str) -> list:
    """Image files directly in `directory` (names), in natural order."""
    return sorted(
        (n for n in os.listdir(directory) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")),
        key=natural_key,
    )
