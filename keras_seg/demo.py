"""The built-in demo dataset: procedurally drawn street scenes in the Cityscapes trainId space.

`python -m keras_seg.train` without `--data` trains on it. Each scene has a sky, buildings with
windows, trees, a road in perspective with lane marks, sidewalks, poles with signs, cars and
people, drawn with texture, noise, random lighting and colour casts so that a pixel's colour alone
does not give its class (grey cars on grey roads under grey skies). It is written once, through
the same writer as real data, to a cache directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import cv2
import numpy as np

from keras_seg import tfrecord
from keras_seg.labels import IGNORE_INDEX, cityscapes_label_space

DEMO_VERSION = 1
DEMO_SIZE = (128, 256)  # stored size (H, W)
DEMO_SPLITS = {"train": 960, "val": 120}
DEMO_SEEDS = {"train": 1, "val": 2}

ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR = 0, 1, 2, 5, 7, 8, 9, 10, 11, 13


def default_cache_dir() -> str:
    root = os.environ.get("KERAS_SEG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "keras_seg")
    return os.path.join(root, f"demo-v{DEMO_VERSION}-{DEMO_SIZE[0]}x{DEMO_SIZE[1]}")


def _noise(rng, shape, scale):
    """Smooth value noise in [-1, 1]: random values at a coarse grid, resized up."""
    h, w = shape
    coarse = rng.uniform(-1, 1, (max(2, h // scale), max(2, w // scale))).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def _fill(image, mask, region, color, cls, rng, texture=12.0, grain=4):
    """Paint `region` (bool) with a textured colour and its class."""
    h, w = mask.shape
    shade = _noise(rng, (h, w), grain)[..., None] * texture
    pixels = np.clip(np.asarray(color, np.float32)[None, None] + shade, 0, 255)
    image[region] = pixels[region]
    mask[region] = cls


def _poly(shape, points):
    region = np.zeros(shape, np.uint8)
    cv2.fillPoly(region, [np.asarray(points, np.int32)], 1)
    return region.astype(bool)


def _grey(rng, low, high):
    v = rng.uniform(low, high)
    return np.array([v, v, v]) + rng.uniform(-12, 12, 3)


def draw_scene(rng: np.random.Generator, size=DEMO_SIZE):
    """One scene: (image uint8 [H, W, 3] RGB, mask uint8 [H, W] trainIds)."""
    h, w = size
    image = np.zeros((h, w, 3), np.float32)
    mask = np.full((h, w), IGNORE_INDEX, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    horizon = int(h * rng.uniform(0.35, 0.55))
    vanish_x = w * rng.uniform(0.3, 0.7)

    # sky: a vertical gradient, blue, grey or dusk, with clouds
    top = rng.choice([np.array([70, 120, 200]), np.array([150, 150, 160]), np.array([200, 140, 110])])
    top = top + rng.uniform(-25, 25, 3)
    bottom = top + rng.uniform(20, 60)
    t = (yy / max(1, horizon))[..., None]
    image[:] = np.clip(top * (1 - t) + bottom * t + _noise(rng, (h, w), 16)[..., None] * 18, 0, 255)
    mask[:] = SKY

    # buildings along the horizon, with window grids
    x = -int(rng.uniform(0, 20))
    while x < w:
        bw = int(rng.uniform(0.12, 0.35) * w)
        bh = int(rng.uniform(0.15, 0.9) * horizon)
        if rng.random() < 0.85:
            region = (xx >= x) & (xx < x + bw) & (yy >= horizon - bh) & (yy < horizon + 4)
            wall = rng.choice([_grey(rng, 90, 180), np.array([150, 90, 70]), np.array([190, 170, 130])])
            _fill(image, mask, region, wall + rng.uniform(-15, 15, 3), BUILDING, rng, texture=10)
            step_y, step_x = int(rng.uniform(6, 11)), int(rng.uniform(6, 12))
            windows = region & ((yy - (horizon - bh)) % step_y < step_y // 2) & ((xx - x) % step_x < step_x // 2)
            windows &= yy < horizon - 3
            image[windows] = np.clip(wall * rng.uniform(0.3, 0.6) + rng.uniform(0, 50), 0, 255)  # still building
        x += bw + int(rng.uniform(0, 0.08) * w)

    # trees: clusters of blobs, some in front of buildings
    for _ in range(int(rng.integers(1, 5))):
        cx, cy = rng.uniform(0, w), horizon - rng.uniform(0, 0.5) * horizon
        blob = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(3, 8))):
            r = rng.uniform(0.04, 0.12) * w
            blob |= (xx - cx - rng.normal(0, r)) ** 2 + (yy - cy - rng.normal(0, r / 2)) ** 2 < r * r
        trunk = (np.abs(xx - cx) < 2) & (yy > cy) & (yy < horizon + 6)
        _fill(image, mask, trunk, (80, 60, 40), VEGETATION, rng, texture=8)
        green = np.array([rng.uniform(40, 90), rng.uniform(90, 150), rng.uniform(30, 70)])
        _fill(image, mask, blob, green, VEGETATION, rng, texture=35, grain=2)

    # ground: terrain (grass verge) below the horizon, then sidewalks and the road in perspective
    ground = yy >= horizon
    _fill(image, mask, ground, (rng.uniform(90, 130), rng.uniform(120, 160), rng.uniform(60, 90)), TERRAIN, rng,
          texture=25, grain=3)
    spread = rng.uniform(0.55, 0.9) * w
    road_l, road_r = vanish_x - spread, vanish_x + spread
    walk = rng.uniform(0.15, 0.3) * w
    sidewalk = _poly((h, w), [(vanish_x - 4, horizon), (vanish_x + 4, horizon), (road_r + walk, h), (road_l - walk, h)])
    _fill(image, mask, sidewalk, _grey(rng, 120, 190) + np.array([20, 0, 0]) * rng.random(), SIDEWALK, rng,
          texture=8, grain=2)
    tiles = sidewalk & (((yy * 3) % 9 == 0) | (((xx + yy) // 2) % 10 == 0))
    image[tiles] *= 0.8
    road = _poly((h, w), [(vanish_x - 2, horizon), (vanish_x + 2, horizon), (road_r, h), (road_l, h)])
    _fill(image, mask, road, _grey(rng, 50, 120), ROAD, rng, texture=10, grain=2)
    dash = road & (np.abs(xx - (vanish_x + (yy - horizon) * rng.uniform(-0.2, 0.2))) < 1 + (yy - horizon) / 40)
    dash &= ((yy - horizon) % 12) < 6
    image[dash] = 220  # lane marks are road

    # poles with signs at the road edges
    for side in (-1, 1):
        if rng.random() < 0.6:
            base_y = int(rng.uniform(horizon + 0.2 * (h - horizon), h - 2))
            frac = (base_y - horizon) / max(1, h - horizon)
            px = int(vanish_x + side * (spread + walk * 0.5) * frac)
            height = int(0.6 * (base_y - horizon) + 10)
            pole = (np.abs(xx - px) <= max(1, int(2 * frac))) & (yy <= base_y) & (yy >= base_y - height)
            _fill(image, mask, pole, _grey(rng, 80, 160), POLE, rng, texture=5)
            s = max(2, int(6 * frac))
            sign = (np.abs(xx - px) <= s) & (np.abs(yy - (base_y - height)) <= s)
            _fill(image, mask, sign, rng.choice([(220, 200, 30), (30, 80, 200), (200, 30, 30)]), SIGN, rng, texture=8)

    # cars on the road, people on the sidewalks; farther objects first, drawn smaller
    objects = [("car", rng.uniform(0.05, 1.0)) for _ in range(int(rng.integers(1, 5)))]
    objects += [("person", rng.uniform(0.1, 1.0)) for _ in range(int(rng.integers(0, 5)))]
    for kind, depth in sorted(objects, key=lambda o: o[1]):
        base_y = horizon + depth * (h - horizon)
        scale = 0.1 + depth
        if kind == "car":
            cw, ch = 0.28 * w * scale / 1.1, 0.12 * w * scale / 1.1
            cx = vanish_x + rng.uniform(-0.8, 0.8) * spread * depth
            body = (np.abs(xx - cx) < cw / 2) & (yy < base_y) & (yy > base_y - ch * 0.6)
            cabin = (np.abs(xx - cx) < cw / 3) & (yy <= base_y - ch * 0.6) & (yy > base_y - ch)
            paint = rng.choice([_grey(rng, 30, 200), np.array([160, 30, 30]), np.array([30, 50, 140]),
                                np.array([220, 220, 220])])
            _fill(image, mask, body | cabin, paint, CAR, rng, texture=10)
            glass = cabin & (yy > base_y - ch * 0.95) & (np.abs(xx - cx) < cw / 3.5)
            image[glass] = np.clip(paint * 0.3 + 40, 0, 255)
            for wx in (cx - cw / 3, cx + cw / 3):
                wheel = (xx - wx) ** 2 + (yy - base_y) ** 2 < (ch * 0.18) ** 2
                _fill(image, mask, wheel, (25, 25, 25), CAR, rng, texture=4)
        else:
            side = rng.choice([-1, 1])
            cx = vanish_x + side * (spread + walk * rng.uniform(0.2, 0.8)) * depth
            ph = 0.45 * h * scale / 1.1
            body = ((xx - cx) / (ph * 0.14)) ** 2 + ((yy - (base_y - ph * 0.45)) / (ph * 0.4)) ** 2 < 1
            head = (xx - cx) ** 2 + (yy - (base_y - ph * 0.92)) ** 2 < (ph * 0.09) ** 2
            _fill(image, mask, body, rng.uniform(20, 220, 3), PERSON, rng, texture=15)
            _fill(image, mask, head, np.array([200, 160, 130]) * rng.uniform(0.5, 1.1), PERSON, rng, texture=8)

    # lighting: exposure, colour cast, gamma, sensor noise, slight blur
    image = image * rng.uniform(0.55, 1.3) * rng.uniform(0.85, 1.15, 3)
    image = 255.0 * (np.clip(image, 0, 255) / 255.0) ** rng.uniform(0.7, 1.4)
    image = image + rng.normal(0, rng.uniform(2, 10), image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        image = cv2.GaussianBlur(image, (3, 3), 0)
    return image, mask


def write_demo_dataset(directory: str, splits=None, size=DEMO_SIZE, log=print, progress=False) -> str:
    """Writes the demo dataset to `directory` (if it is not there already); returns the directory.

    `progress` shows a progress bar over the scenes (on stderr).
    """
    from tqdm import tqdm

    splits = splits or DEMO_SPLITS
    if os.path.exists(os.path.join(directory, tfrecord.DATASET_INFO_NAME)):
        return directory
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    log(f"writing the demo dataset ({', '.join(f'{n} {s}' for s, n in splits.items())} scenes) to {directory}")
    staging = tempfile.mkdtemp(prefix=".demo-", dir=parent)
    bar = tqdm(total=sum(splits.values()), unit="scene", desc="demo data", disable=not progress)
    try:
        space = cityscapes_label_space("trainid")
        infos = {}
        for split, count in splits.items():
            rng = np.random.default_rng(DEMO_SEEDS.get(split, 0))
            writer = tfrecord.ShardedWriter(staging, split, num_examples=count, num_shards=2)
            counts = np.zeros(256, np.int64)
            for i in range(count):
                image, mask = draw_scene(rng, size)
                jpeg = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()
                png = cv2.imencode(".png", mask)[1].tobytes()
                writer.write(tfrecord.encode_example(jpeg, "jpeg", png, *size, f"demo/{split}/{i:05d}"), i)
                counts += np.bincount(mask.ravel(), minlength=256)
                bar.update(1)
            writer.close()
            infos[split] = {
                "num_examples": count,
                "shards": writer.commit(),
                "class_pixel_counts": counts[: space.num_classes].tolist(),
                "ignored_pixels": int(counts[IGNORE_INDEX]),
                "total_pixels": int(counts.sum()),
                "image_sizes": {f"{size[0]}x{size[1]}": count},
                "image_formats": {"jpeg": count},
                "skipped": [],
            }
        info = tfrecord.merged_dataset_info(None, {"source": "demo", **space.to_json()}, infos)
        tfrecord.write_dataset_info(staging, info)
        try:
            os.rename(staging, directory)  # atomic: a half-written demo is never picked up
        except OSError:
            if not os.path.exists(os.path.join(directory, tfrecord.DATASET_INFO_NAME)):
                raise  # otherwise another process finished first: use its copy
    finally:
        bar.close()
        if os.path.exists(staging):
            shutil.rmtree(staging)
    return directory
