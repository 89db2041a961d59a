"""keras_seg.augment: per-sample, seeded, XLA-compatible augmentation of (image, mask) batches."""

import numpy as np
import pytest
import tensorflow as tf

from keras_seg import distribute
from keras_seg.augment import AugmentConfig, SegmentationAugment, augment_segmentation

IGNORE = 255
# Class k has colour PALETTE[k]; none is black (0), the fill of areas from outside the image.
PALETTE = np.array([[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.2, 0.2, 1.0], [1.0, 1.0, 0.2], [0.2, 1.0, 1.0],
                    [1.0, 0.2, 1.0]], np.float32)
GEOMETRY = AugmentConfig.disabled(flip_prob=0.5, scale_prob=1.0, rotation_prob=1.0, rotation_degrees=30.0)


def colour_coded_batch(batch=4, height=48, width=64, seed=0, block=8):
    """Masks of class blocks (0 = road included) and images whose colours encode the classes."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, len(PALETTE), size=(batch, height // block, width // block))
    masks = np.repeat(np.repeat(blocks, block, axis=1), block, axis=2).astype(np.uint8)
    return PALETTE[masks], masks


def decode_classes(images):
    distance = ((images[..., None, :] - PALETTE) ** 2).sum(-1)
    return distance.argmin(-1), distance.min(-1)


def run(images, masks, seed=(1, 2), config=None, **kwargs):
    out_images, out_masks = augment_segmentation(images, masks, tf.constant(seed), config, **kwargs)
    return out_images.numpy(), out_masks.numpy()


def test_image_and_mask_stay_aligned_exactly_with_nearest_sampling():
    images, masks = colour_coded_batch(batch=8)
    config = AugmentConfig.disabled(**{**GEOMETRY.to_dict(), "image_interpolation": "nearest"})
    out_images, out_masks = run(images, masks, config=config)
    labelled = out_masks != IGNORE
    classes, _ = decode_classes(out_images)
    assert (classes[labelled] == out_masks[labelled]).all()
    # Areas brought in from outside: ignore in the mask exactly where the image is the fill.
    np.testing.assert_array_equal(~labelled, (out_images == 0).all(-1))
    assert (~labelled).any() and labelled.mean() > 0.3


def test_image_and_mask_stay_aligned_with_bilinear_image():
    images, masks = colour_coded_batch(batch=8, block=12)
    out_images, out_masks = run(images, masks, config=GEOMETRY)
    labelled = out_masks != IGNORE
    classes, distance = decode_classes(out_images)
    # Bilinear mixes colours only along class edges; wherever a pixel's colour is a pure class
    # colour, it is the mask's class, and that holds for nearly every labelled pixel.
    pure = labelled & (distance < 1e-4)
    assert (classes[pure] == out_masks[pure]).all()
    assert (classes[labelled] == out_masks[labelled]).mean() > 0.97


def test_mask_values_are_a_subset_of_the_input_and_ignore():
    images, masks = colour_coded_batch(batch=8)
    # Sparse class ids: any averaging of neighbours (bilinear masks) would produce values between.
    masks = np.array([0, 10, 18, 0, 10, 18], np.uint8)[masks]
    masks[:, :8, :8] = IGNORE
    allowed = set(np.unique(masks)) | {IGNORE}
    config = AugmentConfig(occlusion_prob=1.0, occlusion_ignore_mask=True, blur_prob=1.0)
    for seed in range(3):
        _, out_masks = run(images, masks, seed=(seed, 7), config=config)
        assert set(np.unique(out_masks)) <= allowed


def test_outside_area_is_ignore_not_class_zero():
    # All-road (class 0) masks zoomed out and rotated: the border must be 255, never 0.
    masks = np.zeros((4, 32, 32), np.uint8)
    images = np.full((4, 32, 32, 3), 0.5, np.float32)
    config = AugmentConfig.disabled(scale_prob=1.0, scale_range=(0.5, 0.5))
    _, out_masks = run(images, masks, config=config)
    assert set(np.unique(out_masks)) == {0, IGNORE}
    assert ((out_masks == 0).sum(axis=(1, 2)) == 16 * 16).all()  # the image shrinks to a 16x16 block
    masks, images = np.zeros((16, 32, 32), np.uint8), np.full((16, 32, 32, 3), 0.5, np.float32)
    config = AugmentConfig.disabled(rotation_prob=1.0, rotation_degrees=12.0)
    _, out_masks = run(images, masks, config=config)
    rotated = (out_masks == IGNORE).any(axis=(1, 2))
    assert rotated.mean() > 0.5  # angles below ~2 degrees keep every pixel of a 32x32 image
    corners = out_masks[rotated][:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == IGNORE).all()  # rotating brings the corners in from outside
    # And ignore everywhere stays ignore.
    _, out_masks = run(images, np.full_like(masks, IGNORE), config=AugmentConfig())
    assert (out_masks == IGNORE).all()


def test_flip_twice_is_identity():
    images, masks = colour_coded_batch()
    images = images * np.random.default_rng(1).uniform(0.5, 1.0, images.shape).astype(np.float32)
    config = AugmentConfig.disabled(flip_prob=1.0)
    once = run(images, masks, config=config)
    assert not np.array_equal(once[1], masks)
    np.testing.assert_array_equal(once[1], masks[:, :, ::-1])
    twice = run(*once, config=config)
    np.testing.assert_array_equal(twice[0], images)
    np.testing.assert_array_equal(twice[1], masks)


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_zero_rotation_and_unit_scale_are_identity(interpolation):
    images, masks = colour_coded_batch()
    images = images * np.random.default_rng(2).uniform(0.5, 1.0, images.shape).astype(np.float32)
    config = AugmentConfig.disabled(rotation_prob=1.0, rotation_degrees=0.0, scale_prob=1.0, scale_range=(1.0, 1.0),
                                    image_interpolation=interpolation)
    out_images, out_masks = run(images, masks, config=config)
    np.testing.assert_array_equal(out_images, images)
    np.testing.assert_array_equal(out_masks, masks)
    out_images, out_masks = run(images, masks, config=AugmentConfig.disabled())
    np.testing.assert_array_equal(out_images, images)
    np.testing.assert_array_equal(out_masks, masks)


def test_occlusion_leaves_the_mask_untouched_by_default():
    images, masks = colour_coded_batch()
    config = AugmentConfig.disabled(occlusion_prob=1.0, occlusion_fill=0.0)
    out_images, out_masks = run(images, masks, config=config)
    np.testing.assert_array_equal(out_masks, masks)
    covered = (out_images == 0).all(-1)
    assert covered.any(axis=(1, 2)).all()  # every sample got a box
    np.testing.assert_array_equal(out_images[~covered], images[~covered])
    # With the option, the mask is ignore exactly under the boxes.
    _, ignored = run(images, masks, config=AugmentConfig.disabled(occlusion_prob=1.0, occlusion_fill=0.0,
                                                                  occlusion_ignore_mask=True))
    np.testing.assert_array_equal(ignored == IGNORE, covered)


def test_each_sample_draws_its_own_transform():
    images, masks = colour_coded_batch(batch=1)
    images, masks = np.repeat(images, 16, 0), np.repeat(masks, 16, 0)
    out_images, out_masks = run(images, masks, config=AugmentConfig())
    distinct = {out_masks[i].tobytes() for i in range(16)}
    assert len(distinct) > 8
    # Each transform on its own, with probability 1/2: some samples get it, some do not.
    flipped = run(images, masks, config=AugmentConfig.disabled(flip_prob=0.5))[1]
    is_flipped = [np.array_equal(m, masks[0, :, ::-1]) for m in flipped]
    is_same = [np.array_equal(m, masks[0]) for m in flipped]
    assert any(is_flipped) and any(is_same) and all(a or b for a, b in zip(is_flipped, is_same))
    bright = run(images, masks, config=AugmentConfig.disabled(brightness_prob=1.0))[0]
    assert len({float(np.mean(b - images[0])) for b in bright}) > 8


def test_photometric_and_blur_change_the_image_only():
    images, masks = colour_coded_batch(batch=8)
    config = AugmentConfig.disabled(brightness_prob=1.0, contrast_prob=1.0, saturation_prob=1.0, hue_prob=1.0,
                                    blur_prob=1.0)
    out_images, out_masks = run(images, masks, config=config)
    np.testing.assert_array_equal(out_masks, masks)
    assert out_images.min() >= 0.0 and out_images.max() <= 1.0
    assert not np.allclose(out_images, images, atol=1e-3)


def test_seeded_and_reproducible():
    images, masks = colour_coded_batch()
    first = run(images, masks, seed=(3, 4))
    again = run(images, masks, seed=(3, 4))
    other = run(images, masks, seed=(3, 5))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])


def test_value_range_0_255_and_masks_with_a_channel():
    images, masks = colour_coded_batch()
    unit = run(images, masks)
    scaled = run(images * 255.0, masks[..., None], value_range=(0.0, 255.0))
    np.testing.assert_allclose(scaled[0] / 255.0, unit[0], atol=1e-4)
    np.testing.assert_array_equal(scaled[1][..., 0], unit[1])


def test_runs_under_xla():
    images, masks = colour_coded_batch(batch=4)
    config = AugmentConfig(occlusion_prob=0.5, blur_prob=0.5)
    compiled = tf.function(lambda x, y, s: augment_segmentation(x, y, s, config), jit_compile=True)
    out_images, out_masks = compiled(images, masks, tf.constant([5, 6]))
    eager_images, eager_masks = run(images, masks, seed=(5, 6), config=config)
    assert out_images.shape == images.shape and out_masks.dtype == tf.uint8
    # XLA may round coordinates differently by an ulp; outputs agree all but everywhere.
    assert (out_masks.numpy() == eager_masks).mean() > 0.999
    assert np.abs(out_images.numpy() - eager_images).mean() < 1e-3


def test_layer_training_flag_seed_generator_and_config():
    images, masks = colour_coded_batch()
    layer = SegmentationAugment(seed=11)
    same_images, same_masks = layer(images, masks, training=False)
    np.testing.assert_array_equal(same_images, images)
    np.testing.assert_array_equal(same_masks, masks)
    np.testing.assert_array_equal(layer(images, masks)[1], masks)  # training unset: off
    first = layer(images, masks, training=True)[1].numpy()
    second = layer(images, masks, training=True)[1].numpy()
    assert not np.array_equal(first, second)  # the seed generator advances
    np.testing.assert_array_equal(SegmentationAugment(seed=11)(images, masks, training=True)[1], first)
    np.testing.assert_array_equal(layer(images, masks, training=True, seed=tf.constant([1, 2]))[1],
                                  run(images, masks, seed=(1, 2))[1])
    clone = SegmentationAugment.from_config(SegmentationAugment(AugmentConfig(hue_prob=0.0), seed=3).get_config())
    assert clone.augment_config == AugmentConfig(hue_prob=0.0) and clone.seed == 3


def test_layer_under_mirrored_strategy_draws_per_replica():
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        layer = SegmentationAugment(seed=0)
    images, masks = colour_coded_batch(batch=1)
    images, masks = np.repeat(images, 4, 0), np.repeat(masks, 4, 0)
    dist = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors((images, masks)))

    @tf.function
    def step(batch):
        return strategy.run(lambda x, y: layer(x, y, training=True), args=batch)

    _, out_masks = step(next(iter(dist)))
    per_replica = [m.numpy() for m in strategy.experimental_local_results(out_masks)]
    assert [m.shape[0] for m in per_replica] == [2, 2]
    assert not np.array_equal(per_replica[0], per_replica[1])


def test_config_validation():
    with pytest.raises(ValueError, match="flip_prob"):
        AugmentConfig(flip_prob=1.5)
    with pytest.raises(ValueError, match="scale_range"):
        AugmentConfig(scale_range=(2.0, 0.5))
    with pytest.raises(ValueError, match="image_interpolation"):
        AugmentConfig(image_interpolation="bicubic")
    with pytest.raises(TypeError, match="integer"):
        augment_segmentation(np.zeros((1, 4, 4, 3), np.float32), np.zeros((1, 4, 4), np.float32), tf.constant([0, 0]))


# --------------------------------------------------------------------------- photometric, per sample


def _drawn(config, column, low, high, seed, batch):
    """The parameter each sample drew for one transform (the draws are the module's; the transform is not)."""
    from keras_seg import augment

    draws, _ = augment._draws(tf.constant(seed, tf.int64), batch, config)
    return low + draws[:, column].numpy() * (high - low)


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation", "hue"])
def test_photometric_transforms_equal_tf_image_for_the_drawn_parameters(name):
    from keras_seg import augment

    rng = np.random.default_rng(8)
    images = rng.uniform(0.05, 0.95, (10, 12, 16, 3)).astype(np.float32)
    masks = np.zeros((10, 12, 16), np.uint8)
    seed = (3, 9)
    config = AugmentConfig.disabled(**{f"{name}_prob": 0.5})
    column, on_column, low, high, adjust = {
        "brightness": (augment._BRIGHT, augment._BRIGHT_ON, -config.brightness_delta, config.brightness_delta,
                       tf.image.adjust_brightness),
        "contrast": (augment._CONTRAST, augment._CONTRAST_ON, *config.contrast_range, tf.image.adjust_contrast),
        "saturation": (augment._SAT, augment._SAT_ON, *config.saturation_range, tf.image.adjust_saturation),
        "hue": (augment._HUE, augment._HUE_ON, -config.hue_delta, config.hue_delta, tf.image.adjust_hue),
    }[name]
    parameters = _drawn(config, column, low, high, seed, 10)
    chosen = _drawn(config, on_column, 0.0, 1.0, seed, 10) < 0.5
    assert 0 < chosen.sum() < 10  # both kinds of sample are checked
    out, _ = run(images, masks, seed=seed, config=config)
    for k in range(10):
        expected = images[k]
        if chosen[k]:
            expected = np.clip(adjust(images[k], float(parameters[k])).numpy(), 0.0, 1.0)
        np.testing.assert_allclose(out[k], expected, atol=2e-6 if name in ("brightness", "contrast") else 1e-5,
                                   err_msg=f"{name} sample {k} (chosen {chosen[k]}, parameter {parameters[k]:.4f})")
