"""On-device augmentation of (image, mask) batches for semantic segmentation.

`augment_segmentation` is a pure function of (images, masks, seed): it runs on whole batches, on
whatever device the training step runs on, compiles under XLA (`jit_compile=True`) and draws every
transform independently per sample from stateless random ops, so a seed fixes the result.
`SegmentationAugment` is the Keras layer around it, with a seed generator and `training=False` =
identity, for use inside `train_step`.

Transforms, in the order applied:

1. Geometry, one resampling pass: horizontal flip, random scale with a random crop / placement
   window, rotation. The three are composed into one inverse mapping per sample and sampled once
   (gathers), so the image is interpolated once. The mask is sampled with nearest neighbour only,
   at exactly the source pixel the image's nearest / dominant bilinear tap comes from; every output
   pixel whose source lies outside the input is `ignore_index` in the mask and `image_fill` in the
   image.
2. Photometric jitter: brightness, contrast, saturation, hue; then optional Gaussian blur.
3. Occlusion boxes: filled on the image; the mask is left alone unless `occlusion_ignore_mask`.

Why the ops are written here rather than taken from Keras / keras-cv (checked with TF 2.21,
Keras 3.15, keras-cv 0.9.0): `ImageProjectiveTransformV3` (behind `keras.ops.image.affine_transform`
and Keras' RandomRotation / RandomZoom / RandomTranslation) and `crop_and_resize` have no XLA
kernel; Keras' RandomRotation also reflects at the border and fills image and mask alike; keras-cv
rotates masks through one-hot -> bilinear -> argmax, which turns ignore (255) into a class. Keras'
photometric layers have no per-transform probability, convert to HSV once per layer, and, given
an explicit seed, RandomHue draws the sign and the size of the shift from the same uniform (shifts
are then either small and positive or large and negative). Composing flip, scale and rotation
into one gather also means one interpolation instead of three. The TF primitives used here
(gather, floor, stateless random bits, `rgb_to_hsv` / `hsv_to_rgb`, pad) all have XLA kernels.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import tensorflow as tf

from keras_seg.labels import IGNORE_INDEX

# Columns of the per-sample uniform draws (one [batch, _NUM_DRAWS] tensor; see `_draws`).
(
    _FLIP, _SCALE_ON, _SCALE, _CENTER_Y, _CENTER_X, _ROTATE_ON, _ANGLE,
    _BRIGHT_ON, _BRIGHT, _CONTRAST_ON, _CONTRAST, _SAT_ON, _SAT, _HUE_ON, _HUE,
    _BLUR_ON, _BLUR, _OCCLUDE_ON, _NUM_BOXES,
) = range(19)
_NUM_DRAWS = 19


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Per-transform probabilities and ranges; each sample draws each transform independently.

    Brightness deltas and fill values are fractions of the image value range (so the same config
    serves images in [0, 1] and in [0, 255]).

    Attributes:
        flip_prob: probability of a horizontal flip.
        scale_prob: probability of random scaling (with a random crop / placement window).
        scale_range: (min, max) zoom factor, drawn uniformly; > 1 zooms in (crops a part of the image),
            < 1 zooms out (the image shrinks inside the frame; the border becomes ignore).
        rotation_prob: probability of a rotation.
        rotation_degrees: angles are drawn uniformly from [-rotation_degrees, +rotation_degrees].
        brightness_prob / brightness_delta: additive shift drawn from [-delta, +delta].
        contrast_prob / contrast_range: factor around the per-channel mean of the (brightened) input image.
        contrast_centre: "mean" (as `tf.image.adjust_contrast`) or "zero": a plain multiplication of the
            pixel values, as MMSegmentation's PhotoMetricDistortion does.
        saturation_prob / saturation_range: factor on HSV saturation.
        hue_prob / hue_delta: shift of HSV hue drawn from [-delta, +delta] (1.0 = full circle).
        blur_prob / blur_sigma_range: Gaussian blur, sigma in pixels drawn uniformly.
        occlusion_prob: probability that a sample gets occlusion boxes (1..occlusion_max_boxes).
        occlusion_max_boxes: most boxes per sample (static: it sets the work done per batch).
        occlusion_size_range: box height and width, each a fraction of the image's, drawn uniformly.
        occlusion_fill: value of the boxes, fraction of the value range.
        occlusion_ignore_mask: also set the mask to ignore under the boxes (default: mask unchanged).
        image_fill: image value where the geometry brings in area from outside, fraction of the range.
        image_interpolation: "bilinear" (default) or "nearest" for the image; masks are always nearest.
    """

    flip_prob: float = 0.5
    scale_prob: float = 1.0
    scale_range: tuple = (0.5, 2.0)
    rotation_prob: float = 0.5
    rotation_degrees: float = 12.0
    brightness_prob: float = 0.5
    brightness_delta: float = 0.125
    contrast_prob: float = 0.5
    contrast_range: tuple = (0.75, 1.25)
    contrast_centre: str = "mean"
    saturation_prob: float = 0.5
    saturation_range: tuple = (0.75, 1.25)
    hue_prob: float = 0.5
    hue_delta: float = 0.04
    blur_prob: float = 0.0
    blur_sigma_range: tuple = (0.3, 1.5)
    occlusion_prob: float = 0.0
    occlusion_max_boxes: int = 3
    occlusion_size_range: tuple = (0.05, 0.25)
    occlusion_fill: float = 0.5
    occlusion_ignore_mask: bool = False
    image_fill: float = 0.0
    image_interpolation: str = "bilinear"

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if field.name.endswith("_prob") and not 0.0 <= getattr(self, field.name) <= 1.0:
                raise ValueError(f"{field.name} must be in [0, 1], got {getattr(self, field.name)}")
        for name in ("scale_range", "contrast_range", "saturation_range", "blur_sigma_range",
                     "occlusion_size_range"):
            low, high = getattr(self, name)
            if not 0.0 <= low <= high:
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high, got {(low, high)}")
        if self.scale_range[0] <= 0.0:
            raise ValueError(f"scale_range must be positive, got {self.scale_range}")
        if self.blur_prob > 0 and self.blur_sigma_range[1] <= 0.0:
            raise ValueError("blur_sigma_range must reach above 0 when blur_prob > 0")
        if self.occlusion_size_range[1] > 1.0:
            raise ValueError(f"occlusion_size_range is a fraction of the image, got {self.occlusion_size_range}")
        if self.occlusion_max_boxes < 1:
            raise ValueError(f"occlusion_max_boxes must be >= 1, got {self.occlusion_max_boxes}")
        if self.image_interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"image_interpolation must be 'bilinear' or 'nearest', got {self.image_interpolation!r}")
        if self.contrast_centre not in ("mean", "zero"):
            raise ValueError(f"contrast_centre must be 'mean' or 'zero', got {self.contrast_centre!r}")
        for name in ("rotation_degrees", "brightness_delta", "hue_delta"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def disabled(cls, **overrides) -> AugmentConfig:
        """A config with every transform off (probabilities 0), then `overrides` applied."""
        off = {f.name: 0.0 for f in dataclasses.fields(cls) if f.name.endswith("_prob")}
        return cls(**{**off, **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> AugmentConfig:
        """A config from a dict of its fields; lists (as JSON gives them back) become tuples."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _as_config(config) -> AugmentConfig:
    if config is None:
        return AugmentConfig()
    if isinstance(config, AugmentConfig):
        return config
    if isinstance(config, dict):
        return AugmentConfig.from_dict(config)
    raise TypeError(f"config must be an AugmentConfig, a dict or None, got {type(config).__name__}")


# --------------------------------------------------------------------------- random draws


def _unit_uniform(shape, seed):
    """Uniform floats in [0, 1), the same with and without XLA.

    Stateless float draws are not: XLA turns the random bits into floats differently from the
    TF kernels (checked with TF 2.21), so the same seed would give other transforms under
    `jit_compile=True`. The raw 32-bit draws agree; we take their top 24 bits ourselves.
    """
    bits = tf.random.stateless_uniform(shape, seed, minval=None, maxval=None, dtype=tf.uint32, alg="philox")
    return tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) * (1.0 / (1 << 24))


def _draws(seed, batch_size, config):
    """Per-sample uniforms: [batch, _NUM_DRAWS] and, for occlusion, [batch, max_boxes, 4]."""
    seed = tf.cast(seed, tf.int64)
    scalar_seed, box_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2, alg="philox"))
    uniforms = _unit_uniform([batch_size, _NUM_DRAWS], scalar_seed)
    boxes = _unit_uniform([batch_size, config.occlusion_max_boxes, 4], box_seed)
    return uniforms, boxes


def _pick(draws, on_column, prob, value, identity):
    """`value` where a sample's draw says the transform is on, else exactly `identity`."""
    return tf.where(draws[:, on_column] < prob, value, identity)


def _uniform(draws, column, low, high):
    return low + draws[:, column] * (high - low)


# --------------------------------------------------------------------------- geometry


def _source_coordinates(draws, height, width, config):
    """Where each output pixel comes from: continuous (y, x) in input pixels, [B, H, W] each.

    Pixel (i, j) covers [i, i+1) x [j, j+1); its centre is (i + 0.5, j + 0.5). The forward map is
    flip, then scale about the crop centre, then rotation about the output centre; we compute its
    inverse for each output pixel centre. With every transform off the result is the pixel centre
    itself, exactly (the operations reduce to adding and multiplying by 0 and 1).
    """
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    scale = _pick(draws, _SCALE_ON, config.scale_prob, _uniform(draws, _SCALE, *config.scale_range), 1.0)
    radians = config.rotation_degrees * math.pi / 180.0
    angle = _pick(draws, _ROTATE_ON, config.rotation_prob, _uniform(draws, _ANGLE, -radians, radians), 0.0)
    # The window of the output in input coordinates has half-size (h/2s, w/2s); its centre moves
    # so that the window stays inside the image (s >= 1) or the image inside the window (s < 1).
    center_y = h / 2 + (2.0 * draws[:, _CENTER_Y] - 1.0) * (h / 2 - h / (2 * scale))
    center_x = w / 2 + (2.0 * draws[:, _CENTER_X] - 1.0) * (w / 2 - w / (2 * scale))
    flip = draws[:, _FLIP] < config.flip_prob

    out_y = (tf.range(h) + 0.5 - h / 2)[None, :, None]
    out_x = (tf.range(w) + 0.5 - w / 2)[None, None, :]
    cos = tf.cos(angle)[:, None, None]
    sin = tf.sin(angle)[:, None, None]
    inv_scale = (1.0 / scale)[:, None, None]
    src_y = center_y[:, None, None] + (cos * out_y - sin * out_x) * inv_scale
    src_x = center_x[:, None, None] + (sin * out_y + cos * out_x) * inv_scale
    src_x = tf.where(flip[:, None, None], w - src_x, src_x)
    return src_y, src_x


def _flat_index(batch_size, height, width, rows, cols):
    """Index into the [B * H * W, ...] flattened batch; rows / cols are [B, ...]."""
    base = tf.reshape(tf.range(batch_size) * (height * width), [-1] + [1] * (rows.shape.rank - 1))
    return base + rows * width + cols


def _resample(images, masks, src_y, src_x, config, fill, ignore_index):
    """Sample images (bilinear or nearest) and masks (nearest) at the source coordinates.

    Both are gathered from the flattened batch with one extra entry appended, the fill value (image)
    and the ignore index (mask); output pixels whose source lies outside the input gather that
    entry. So the outside is decided once, in the same place for image and mask.
    """
    batch_size, height, width = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
    channels = images.shape[-1] if images.shape[-1] is not None else tf.shape(images)[-1]
    outside = batch_size * height * width  # index of the appended fill / ignore entry
    # The nearest source pixel; valid where it lies inside the input. Image and mask share it.
    near_y = tf.cast(tf.floor(src_y), tf.int32)
    near_x = tf.cast(tf.floor(src_x), tf.int32)
    valid = (near_y >= 0) & (near_y < height) & (near_x >= 0) & (near_x < width)
    near = tf.where(valid, _flat_index(batch_size, height, width, near_y, near_x), outside)

    # Masks go through int32: gathers on uint8 lack GPU kernels outside XLA. Values never mix.
    flat_masks = tf.concat([tf.reshape(tf.cast(masks, tf.int32), [-1]), [ignore_index]], axis=0)
    out_masks = tf.cast(tf.gather(flat_masks, near), masks.dtype)

    flat_images = tf.concat([tf.reshape(images, [-1, channels]), tf.fill([1, channels], fill)], axis=0)
    if config.image_interpolation == "nearest":
        return tf.gather(flat_images, near), out_masks
    # Bilinear between the four pixel centres around the point. Clamping the point into the
    # centres' range equals replicating the edge, and keeps the taps in the image.
    pos_y = tf.clip_by_value(src_y - 0.5, 0.0, tf.cast(height - 1, tf.float32))
    pos_x = tf.clip_by_value(src_x - 0.5, 0.0, tf.cast(width - 1, tf.float32))
    y0f, x0f = tf.floor(pos_y), tf.floor(pos_x)
    wy, wx = pos_y - y0f, pos_x - x0f
    y0, x0 = tf.cast(y0f, tf.int32), tf.cast(x0f, tf.int32)
    y1, x1 = tf.minimum(y0 + 1, height - 1), tf.minimum(x0 + 1, width - 1)
    rows = tf.stack([y0, y0, y1, y1], axis=-1)
    cols = tf.stack([x0, x1, x0, x1], axis=-1)
    taps = tf.where(valid[..., None], _flat_index(batch_size, height, width, rows, cols), outside)
    weights = tf.stack([(1.0 - wy) * (1.0 - wx), (1.0 - wy) * wx, wy * (1.0 - wx), wy * wx], axis=-1)
    weights = tf.where(valid[..., None], weights, tf.constant([1.0, 0.0, 0.0, 0.0]))  # exactly the fill
    # A reduction, not a sum of four products: XLA does not fuse a reduction into its consumers,
    # so the resampled image is computed once. As an elementwise sum it was recomputed inside
    # every consumer that reads a pixel more than once (contrast's mean, HSV's three channels),
    # which made the whole augmentation 2.5x slower on CPU.
    out_images = tf.reduce_sum(tf.gather(flat_images, taps) * weights[..., None], axis=-2)
    return out_images, out_masks


# --------------------------------------------------------------------------- photometric


def _photometric(images, draws, config, mean):
    """Brightness, contrast, saturation, hue on images in [0, 1]; unchosen samples stay bit-exact.

    `mean` [B, 1, 1, C] is each input image's per-channel mean, the centre of the contrast change.
    It is taken before the geometry (so area brought in from outside does not pull it towards the
    fill value) and is passed in rather than reduced here: a reduction over the resampled batch
    made XLA recompute the resampling for each of its consumers, 4x slower on CPU.
    """
    per_sample = (slice(None), None, None, None)
    if config.brightness_prob > 0:
        delta = _uniform(draws, _BRIGHT, -config.brightness_delta, config.brightness_delta)
        delta = _pick(draws, _BRIGHT_ON, config.brightness_prob, delta, 0.0)[per_sample]
        images = tf.clip_by_value(images + delta, 0.0, 1.0)
        mean = tf.clip_by_value(mean + delta, 0.0, 1.0)
    if config.contrast_prob > 0:
        on = (draws[:, _CONTRAST_ON] < config.contrast_prob)[per_sample]
        factor = _uniform(draws, _CONTRAST, *config.contrast_range)[per_sample]
        if config.contrast_centre == "zero":
            mean = tf.zeros_like(mean)
        # As tf.image.adjust_contrast, but with a factor per sample; (x - m) + m is not bit-exact,
        # so samples without the transform keep their input.
        images = tf.where(on, tf.clip_by_value((images - mean) * factor + mean, 0.0, 1.0), images)
    if config.saturation_prob > 0 or config.hue_prob > 0:
        sat_on = draws[:, _SAT_ON] < config.saturation_prob
        hue_on = draws[:, _HUE_ON] < config.hue_prob
        factor = tf.where(sat_on, _uniform(draws, _SAT, *config.saturation_range), 1.0)[:, None, None]
        shift = tf.where(hue_on, _uniform(draws, _HUE, -config.hue_delta, config.hue_delta), 0.0)[:, None, None]
        # One HSV round trip for both; tf.image.adjust_hue/saturation take one scalar per call.
        hue, sat, value = tf.unstack(tf.image.rgb_to_hsv(images), axis=-1)
        hue = tf.math.floormod(hue + shift, 1.0)
        sat = tf.clip_by_value(sat * factor, 0.0, 1.0)
        jittered = tf.clip_by_value(tf.image.hsv_to_rgb(tf.stack([hue, sat, value], axis=-1)), 0.0, 1.0)
        # The round trip is not bit-exact, so samples with neither transform keep their input.
        images = tf.where((sat_on | hue_on)[per_sample], jittered, images)
    return images


def _gaussian_blur(images, draws, config):
    """Separable Gaussian blur, sigma per sample; kernel radius fixed by the largest sigma (static)."""
    sigma_max = config.blur_sigma_range[1]
    radius = max(1, math.ceil(3.0 * sigma_max))
    sigma = tf.maximum(_uniform(draws, _BLUR, *config.blur_sigma_range), 1e-3)
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    weights = tf.exp(-0.5 * tf.square(taps[None, :] / sigma[:, None]))
    weights = weights / tf.reduce_sum(weights, axis=1, keepdims=True)  # [B, 2r+1]
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    # Mirrored edges (SYMMETRIC needs radius <= size): zero padding would darken the border.
    padded = tf.pad(images, [[0, 0], [radius, radius], [0, 0], [0, 0]], "SYMMETRIC")
    blurred = tf.add_n([weights[:, k, None, None, None] * padded[:, k:k + height] for k in range(2 * radius + 1)])
    padded = tf.pad(blurred, [[0, 0], [0, 0], [radius, radius], [0, 0]], "SYMMETRIC")
    blurred = tf.add_n([weights[:, k, None, None, None] * padded[:, :, k:k + width] for k in range(2 * radius + 1)])
    on = draws[:, _BLUR_ON] < config.blur_prob
    return tf.where(on[:, None, None, None], blurred, images)


# --------------------------------------------------------------------------- occlusion


def _occlusion_boxes(draws, box_draws, height, width, config):
    """[B, H, W] bool: pixels under a sample's occlusion boxes."""
    max_boxes = config.occlusion_max_boxes
    on = draws[:, _OCCLUDE_ON] < config.occlusion_prob
    count = 1 + tf.cast(tf.floor(draws[:, _NUM_BOXES] * max_boxes), tf.int32)  # 1..max_boxes
    count = tf.minimum(count, max_boxes)
    active = on[:, None] & (tf.range(max_boxes)[None, :] < count[:, None])  # [B, M]
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    low, high = config.occlusion_size_range
    box_h = (low + box_draws[..., 0] * (high - low)) * h
    box_w = (low + box_draws[..., 1] * (high - low)) * w
    top = box_draws[..., 2] * (h - box_h)
    left = box_draws[..., 3] * (w - box_w)
    ys = tf.range(h)[None, None, :] + 0.5
    xs = tf.range(w)[None, None, :] + 0.5
    rows = (ys >= top[..., None]) & (ys < (top + box_h)[..., None]) & active[..., None]  # [B, M, H]
    cols = (xs >= left[..., None]) & (xs < (left + box_w)[..., None])  # [B, M, W]
    return tf.reduce_any(rows[..., :, None] & cols[..., None, :], axis=1)


# --------------------------------------------------------------------------- entry points


def augment_segmentation(images, masks, seed, config=None, *, value_range=(0.0, 1.0), ignore_index=IGNORE_INDEX):
    """Augment a batch of images and their masks, every transform drawn per sample.

    Args:
        images: float [B, H, W, 3], values in `value_range`.
        masks: integer [B, H, W] (or [B, H, W, 1]) of class indices and `ignore_index`.
        seed: int32/int64 tensor of shape [2]; the output is a function of (inputs, seed, config).
        config: `AugmentConfig`, a dict of its fields, or None for the defaults.
        value_range: (low, high) of the image values.
        ignore_index: mask value for pixels without a label.

    Returns:
        (images, masks) with the input shapes and dtypes.
    """
    config = _as_config(config)
    images = tf.convert_to_tensor(images)
    masks = tf.convert_to_tensor(masks)
    if not images.dtype.is_floating:
        raise TypeError(f"images must be floating point (values in {value_range}), got {images.dtype}")
    if masks.dtype.is_floating:
        raise TypeError(f"masks must hold integer class indices, got {masks.dtype}")
    image_dtype = images.dtype
    mask_rank4 = masks.shape.rank == 4
    if mask_rank4:
        masks = masks[..., 0]

    low, high = float(value_range[0]), float(value_range[1])
    x = tf.cast(images, tf.float32)
    if (low, high) != (0.0, 1.0):
        x = (x - low) / (high - low)
    batch_size, height, width = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
    draws, box_draws = _draws(seed, batch_size, config)

    mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)  # of the input, see _photometric
    if config.flip_prob > 0 or config.scale_prob > 0 or config.rotation_prob > 0:
        src_y, src_x = _source_coordinates(draws, height, width, config)
        x, masks = _resample(x, masks, src_y, src_x, config, config.image_fill, ignore_index)
    x = _photometric(x, draws, config, mean)
    if config.blur_prob > 0:
        x = _gaussian_blur(x, draws, config)
    if config.occlusion_prob > 0:
        covered = _occlusion_boxes(draws, box_draws, height, width, config)
        x = tf.where(covered[..., None], tf.cast(config.occlusion_fill, tf.float32), x)
        if config.occlusion_ignore_mask:
            masks = tf.where(covered, tf.cast(ignore_index, masks.dtype), masks)

    if (low, high) != (0.0, 1.0):
        x = x * (high - low) + low
    if mask_rank4:
        masks = masks[..., None]
    return tf.cast(x, image_dtype), masks


@keras.saving.register_keras_serializable(package="keras_seg")
class SegmentationAugment(keras.layers.Layer):
    """Keras layer: `augment_segmentation` on (images, masks) while training, identity otherwise.

    Call it inside the training step: `images, masks = augment(images, masks, training=True)`.
    Seeds come from the layer's `keras.random.SeedGenerator` (reproducible from `seed`), or from
    the `seed` call argument ([2] int tensor, e.g. built from the optimizer step) when given; under
    `tf.distribute` the replica id is folded in so that replicas draw different transforms.
    A replica function compiled with XLA under `MirroredStrategy` cannot update the generator's
    (mirrored) state, as it cannot update any variable there: pass `seed` in that case.

    Args:
        config: `AugmentConfig`, a dict of its fields, or None for the defaults.
        seed: int seed of the layer's seed generator (None: random).
        value_range: (low, high) of the image values.
        ignore_index: mask value for pixels without a label.
    """

    def __init__(self, config=None, *, seed=None, value_range=(0.0, 1.0), ignore_index=IGNORE_INDEX, **kwargs):
        super().__init__(**kwargs)
        self.augment_config = _as_config(config)
        self.seed = seed
        self.value_range = tuple(value_range)
        self.ignore_index = ignore_index
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, masks, training=None, seed=None):
        if not training:
            return images, masks
        if seed is None:
            seed = self.seed_generator.next()
        seed = tf.cast(seed, tf.int64)
        replica = tf.distribute.get_replica_context()
        if replica is not None and replica.num_replicas_in_sync > 1:
            replica_id = tf.cast(replica.replica_id_in_sync_group, tf.int64)
            seed = tf.random.experimental.stateless_fold_in(seed, replica_id, alg="philox")
        return augment_segmentation(
            images, masks, seed, self.augment_config, value_range=self.value_range, ignore_index=self.ignore_index
        )

    def compute_output_spec(self, images, masks, training=None, seed=None):
        return (keras.KerasTensor(images.shape, images.dtype), keras.KerasTensor(masks.shape, masks.dtype))

    def get_config(self):
        return {
            **super().get_config(),
            "config": self.augment_config.to_dict(),
            "seed": self.seed,
            "value_range": list(self.value_range),
            "ignore_index": self.ignore_index,
        }
