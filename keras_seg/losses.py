"""Segmentation losses: weighted cross-entropy, soft Dice, focal, OHEM, Lovasz-Softmax, and weighted sums of them.

Every loss takes masks `y_true` [B, H, W] or [B, H, W, 1] (class indices; Keras may hand them over
as floats) and logits `y_pred` [B, H, W, C]; pixels labelled `ignore_index` (255) take no part.
They compute in float32 whatever the logits' dtype, so `mixed_float16` logits give finite values
and gradients. A batch whose pixels are all ignored has loss 0.

Class weights are given explicitly or computed from the training split's pixel counts in
`dataset_info.json` with `compute_class_weights`.

    model.compile(optimizer="adam", loss=build_loss("ce+dice", class_weights=weights))
"""

from __future__ import annotations

import functools
import re

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_seg.labels import IGNORE_INDEX

CLASS_WEIGHTING = ("inverse_frequency", "median_frequency", "enet")


def compute_class_weights(counts_or_info, method: str = "median_frequency", split: str = "train", enet_c: float = 1.02):
    """Per-class loss weights from pixel counts.

    With `n_c` the pixels of class c, `N` their sum, `f_c = n_c / N` and `C` the number of classes:
    - `inverse_frequency`: `N / (C n_c)`, so that the average weight over pixels is 1
      (scikit-learn's "balanced");
    - `median_frequency`: `median(f) / f_c`, median-frequency balancing (Eigen & Fergus 2015,
      SegNet), with f over the whole split rather than over the images that hold the class;
    - `enet`: `1 / ln(enet_c + f_c)` with `enet_c = 1.02` (ENet, Paszke et al. 2016): weights in [1, 50].
    A class with no pixels gets weight 0 (it is never a target), and is left out of the median.

    Args:
        counts_or_info: per-class pixel counts (a sequence or array), or a `dataset_info.json`
            dict (as `keras_seg.tfrecord.load_dataset_info` returns), read at
            `splits[split].class_pixel_counts`.
        method: str. One of `inverse_frequency`, `median_frequency`, `enet`.
        split: str. The split whose counts are used when given an info dict.
        enet_c: float. ENet's constant c (> 1).

    Returns:
        float32 numpy array of shape [num_classes].
    """
    if isinstance(counts_or_info, dict):
        info = counts_or_info
        try:
            counts = info["splits"][split]["class_pixel_counts"]
        except KeyError as err:
            raise ValueError(f"dataset info lacks splits.{split}.class_pixel_counts") from err
        if "num_classes" in info and len(counts) != info["num_classes"]:
            raise ValueError(f"{len(counts)} class pixel counts for num_classes={info['num_classes']}")
    else:
        counts = counts_or_info
    counts = np.asarray(counts, np.float64)
    if counts.ndim != 1 or counts.size == 0 or (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(f"class pixel counts must be a non-empty list of counts >= 0, not all 0; got {counts}")
    if method not in CLASS_WEIGHTING:
        raise ValueError(f"unknown class weighting {method!r}; choose one of {', '.join(CLASS_WEIGHTING)}")
    if enet_c <= 1:
        raise ValueError(f"enet_c must be > 1, got {enet_c}")

    present = counts > 0
    frequency = counts / counts.sum()
    weights = np.zeros_like(frequency)
    if method == "inverse_frequency":
        weights[present] = counts.sum() / (counts.size * counts[present])
    elif method == "median_frequency":
        weights[present] = np.median(frequency[present]) / frequency[present]
    else:
        weights[present] = 1.0 / np.log(enet_c + frequency[present])
    return weights.astype(np.float32)


def _labels_and_logits(y_true, y_pred, ignore_index):
    """int32 labels [B, H, W] (ignored pixels set to 0), the float32 valid-pixel mask, float32 logits."""
    logits = ops.cast(y_pred, "float32")
    labels = ops.cast(y_true, "int32")
    if len(labels.shape) == len(logits.shape):
        labels = ops.squeeze(labels, axis=-1)
    valid = ops.not_equal(labels, ignore_index)
    labels = ops.where(valid, labels, 0)
    return labels, ops.cast(valid, "float32"), logits


def _per_valid_pixel(pixel_losses, valid):
    """Per-pixel losses scaled so that their mean over all pixels is the mean over the valid ones.

    Keras averages what `call` returns over all its elements (and divides by the replica count
    under tf.distribute); scaling by total/valid pixels makes that the mean over valid pixels, and
    0, not NaN, when none is valid.
    """
    return ops.divide_no_nan(pixel_losses * valid, ops.mean(valid))


def _check_class_weights(class_weights):
    if class_weights is None:
        return None
    weights = np.asarray(class_weights, np.float32)
    if weights.ndim != 1 or (weights < 0).any() or not np.isfinite(weights).all():
        raise ValueError(f"class_weights must be a list of finite values >= 0, got {class_weights}")
    return weights


class _SegmentationLoss(keras.losses.Loss):
    """Shared arguments: class weights and the ignore index; float32 computation."""

    def __init__(
        self, class_weights=None, ignore_index: int = IGNORE_INDEX, name=None, reduction="sum_over_batch_size"
    ):
        super().__init__(name=name, reduction=reduction, dtype="float32")
        self.class_weights = _check_class_weights(class_weights)
        self.ignore_index = int(ignore_index)

    # The trainer reduces a loss over the global batch (all replicas, all workers): each replica
    # computes `statistics` (sums over its pixels), the trainer sums them across replicas, and
    # `from_statistics` turns the sums into the loss. `call` (model.fit, standalone use) is the
    # same computation over one batch.

    def statistics(self, y_true, y_pred) -> dict:
        raise NotImplementedError

    def from_statistics(self, stats):
        raise NotImplementedError

    # Gradient accumulation (`keras_seg.replicas.global_batch_loss(totals=...)`) needs the sums of the
    # whole accumulated batch. `mask_statistics` gives those that the masks alone decide (a subset
    # of `statistics`' keys); a loss whose value is not linear in the others (`NEEDS_TOTALS`: Dice)
    # needs them all, from a forward pass over every micro-batch first.
    NEEDS_TOTALS = False

    def mask_statistics(self, y_true) -> dict:
        raise NotImplementedError

    def _pixel_weights(self, labels):
        return 1.0 if self.class_weights is None else ops.take(ops.convert_to_tensor(self.class_weights), labels)

    def get_config(self):
        weights = None if self.class_weights is None else self.class_weights.tolist()
        return {**super().get_config(), "class_weights": weights, "ignore_index": self.ignore_index}


class _PerPixelLoss(_SegmentationLoss):
    """A loss that is a per-pixel value (`_pixel_losses`) averaged over the valid pixels."""

    def _pixel_losses(self, y_true, y_pred):
        raise NotImplementedError

    def call(self, y_true, y_pred):
        return _per_valid_pixel(*self._pixel_losses(y_true, y_pred))

    def statistics(self, y_true, y_pred):
        losses, valid = self._pixel_losses(y_true, y_pred)
        return {"sum": ops.sum(losses * valid), "count": ops.sum(valid)}

    def from_statistics(self, stats):
        return ops.divide_no_nan(stats["sum"], stats["count"])

    def mask_statistics(self, y_true):
        valid = ops.not_equal(ops.cast(y_true, "int32"), self.ignore_index)
        return {"count": ops.sum(ops.cast(valid, "float32"))}


@keras.saving.register_keras_serializable(package="keras_seg")
class CrossEntropyLoss(_PerPixelLoss):
    """Cross-entropy from logits, optionally class-weighted, averaged over the valid pixels.

    The weighted sum is divided by the number of valid pixels (not by the sum of their weights,
    as PyTorch's weighted `CrossEntropyLoss` does), so weights scale the loss; with weights from
    `compute_class_weights("inverse_frequency")` the average pixel weight is 1.

    Args:
        class_weights: per-class weights [C], or None.
        ignore_index: int. Label of ignored pixels.
    """

    def __init__(self, class_weights=None, ignore_index: int = IGNORE_INDEX, name="cross_entropy", **kwargs):
        super().__init__(class_weights, ignore_index, name=name, **kwargs)

    def _pixel_losses(self, y_true, y_pred):
        labels, valid, logits = _labels_and_logits(y_true, y_pred, self.ignore_index)
        # log-sum-exp minus the label's logit, picked by a one-hot product: its gradient (softmax -
        # one_hot) is elementwise. On CPU-B, one core, 8x128x256x19 logits, value and gradient took
        # 47 ms this way, 81 ms with TF's fused SparseSoftmaxCrossEntropyWithLogits (10% of the
        # trainer's step in the profile, docs/performance.md) and more with log_softmax +
        # take_along_axis, whose gradient is a scatter.
        picked = ops.sum(logits * ops.one_hot(labels, logits.shape[-1], dtype=logits.dtype), axis=-1)
        nll = ops.logsumexp(logits, axis=-1) - picked
        return nll * self._pixel_weights(labels), valid


@keras.saving.register_keras_serializable(package="keras_seg")
class FocalLoss(_PerPixelLoss):
    """Focal loss `-w_c (1 - p_t)^gamma log p_t` (Lin et al. 2017), averaged over the valid pixels.

    Args:
        gamma: float >= 0. Focusing parameter; 0 gives the cross-entropy.
        class_weights: per-class weights [C] (the paper's alpha), or None.
        ignore_index: int. Label of ignored pixels.
    """

    def __init__(
        self, gamma: float = 2.0, class_weights=None, ignore_index: int = IGNORE_INDEX, name="focal", **kwargs
    ):
        super().__init__(class_weights, ignore_index, name=name, **kwargs)
        if gamma < 0:
            raise ValueError(f"focal loss gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)

    def _pixel_losses(self, y_true, y_pred):
        labels, valid, logits = _labels_and_logits(y_true, y_pred, self.ignore_index)
        log_pt = ops.squeeze(ops.take_along_axis(ops.log_softmax(logits, axis=-1), labels[..., None], axis=-1), axis=-1)
        # The floor keeps the gradient of (1 - p_t)^gamma finite at p_t = 1 when gamma < 1.
        modulation = ops.power(ops.maximum(1.0 - ops.exp(log_pt), 1e-12), self.gamma)
        return -modulation * log_pt * self._pixel_weights(labels), valid

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma}


@keras.saving.register_keras_serializable(package="keras_seg")
class OhemCrossEntropyLoss(_SegmentationLoss):
    """Online hard example mining cross-entropy, as MMSegmentation's `OhemCrossEntropy` (DDRNet's loss).

    Of a batch's valid pixels it keeps those whose softmax probability of their true class is below
    `max(thresh, p_k)`, where p_k is the (min_kept + 1)-th smallest such probability, so at least
    `min_kept` pixels (or all, if fewer) are kept; the loss is the mean (class-weighted) cross-entropy
    of the kept pixels. The selection is per replica batch, as MMSegmentation's is per GPU; across
    replicas the kept pixels' sums and counts are added, so the loss is the mean over every kept
    pixel. With `--accumulate` the selection is per micro-batch.

    Args:
        thresh: float in (0, 1]. Pixels predicted with at least this probability count as easy.
        min_kept: int >= 1. Pixels kept at least, per batch. The defaults are DDRNet's Cityscapes
            config (0.9, 131,072).
        class_weights: per-class weights [C], or None.
        ignore_index: int. Label of ignored pixels.
    """

    def __init__(self, thresh: float = 0.9, min_kept: int = 131072, class_weights=None,
                 ignore_index: int = IGNORE_INDEX, name="ohem_cross_entropy", **kwargs):
        super().__init__(class_weights, ignore_index, name=name, **kwargs)
        if not 0 < thresh <= 1:
            raise ValueError(f"ohem thresh must be in (0, 1], got {thresh}")
        if int(min_kept) < 1:
            raise ValueError(f"ohem min_kept must be >= 1, got {min_kept}")
        self.thresh, self.min_kept = float(thresh), int(min_kept)

    def _kept_and_losses(self, y_true, y_pred):
        labels, valid, logits = _labels_and_logits(y_true, y_pred, self.ignore_index)
        one_hot = ops.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
        nll = ops.logsumexp(logits, axis=-1) - ops.sum(logits * one_hot, axis=-1)
        # The selection is not differentiated (as MMSegmentation's, under no_grad).
        true_probability = ops.stop_gradient(ops.exp(-nll))
        # Ignored pixels sort after every valid one (probabilities are at most 1).
        ranked = ops.sort(ops.reshape(ops.where(valid > 0, true_probability, 2.0), (-1,)))
        valid_count = ops.cast(ops.sum(valid), "int32")
        index = ops.maximum(ops.minimum(self.min_kept, valid_count - 1), 0)
        threshold = ops.maximum(ops.take(ranked, index), self.thresh)
        kept = valid * ops.cast(ops.less(true_probability, threshold), "float32")
        return nll * self._pixel_weights(labels), kept

    def statistics(self, y_true, y_pred):
        losses, kept = self._kept_and_losses(y_true, y_pred)
        return {"sum": ops.sum(losses * kept), "count": ops.sum(kept)}

    def from_statistics(self, stats):
        return ops.divide_no_nan(stats["sum"], stats["count"])

    NEEDS_TOTALS = True  # the kept pixels depend on the predictions

    def mask_statistics(self, y_true):
        return {}

    def call(self, y_true, y_pred):
        losses, kept = self._kept_and_losses(y_true, y_pred)
        return _per_valid_pixel(losses, kept)

    def get_config(self):
        return {**super().get_config(), "thresh": self.thresh, "min_kept": self.min_kept}


@keras.saving.register_keras_serializable(package="keras_seg")
class DiceLoss(_SegmentationLoss):
    """Soft multi-class Dice loss from logits: `1 - weighted mean over classes of the soft Dice`.

    Per class c, over the valid pixels of the whole batch, with softmax probabilities p and one-hot
    targets t: `dice_c = (2 sum(p_c t_c) + smooth) / (sum(p_c) + sum(t_c) + smooth)`. A class
    absent from the batch scores about 0 while the model gives it probability, so the loss also
    pushes probabilities of absent classes down; with no valid pixel every dice_c is 1 and the loss 0.
    The loss is a batch-level value: it is returned once per image for Keras to average.

    Args:
        smooth: float > 0. Added to numerator and denominator.
        class_weights: per-class weights [C] of the mean, or None (equal weights).
        ignore_index: int. Label of ignored pixels.
    """

    def __init__(
        self, smooth: float = 1.0, class_weights=None, ignore_index: int = IGNORE_INDEX, name="dice", **kwargs
    ):
        super().__init__(class_weights, ignore_index, name=name, **kwargs)
        if smooth <= 0:
            raise ValueError(f"dice smooth must be > 0, got {smooth}")
        self.smooth = float(smooth)

    def statistics(self, y_true, y_pred):
        labels, valid, logits = _labels_and_logits(y_true, y_pred, self.ignore_index)
        num_classes = logits.shape[-1]
        probs = ops.softmax(logits, axis=-1) * valid[..., None]
        targets = ops.one_hot(labels, num_classes, dtype="float32") * valid[..., None]
        pixel_axes = tuple(range(len(logits.shape) - 1))
        return {"intersection": ops.sum(probs * targets, axis=pixel_axes),
                "cardinality": ops.sum(probs, axis=pixel_axes) + ops.sum(targets, axis=pixel_axes)}

    NEEDS_TOTALS = True

    def mask_statistics(self, y_true):
        return {}  # the cardinalities hold the predicted probabilities

    def from_statistics(self, stats):
        dice = (2.0 * stats["intersection"] + self.smooth) / (stats["cardinality"] + self.smooth)
        if self.class_weights is None:
            return 1.0 - ops.mean(dice)
        weights = ops.convert_to_tensor(self.class_weights)
        return 1.0 - ops.sum(weights * dice) / ops.maximum(ops.sum(weights), 1e-12)

    def call(self, y_true, y_pred):
        loss = self.from_statistics(self.statistics(y_true, y_pred))
        # One value per image (Keras scales non-scalar losses for tf.distribute, not scalars).
        return ops.zeros_like(ops.cast(y_pred[:, 0, 0, 0], "float32")) + loss

    def get_config(self):
        return {**super().get_config(), "smooth": self.smooth}


LOVASZ_CLASSES = ("present", "all")


def _lovasz_class_losses(counts, sums):
    """Per-class Lovasz-Softmax values [..., C] from error histograms.

    `counts` and `sums` [..., C, 2, L]: per class, for its foreground (index 0) and background (1)
    pixels, how many errors fall in each of L equal levels of [0, 1] and their sum. Sorting the
    errors in decreasing order is replaced by taking the levels from the top; within a level the
    foreground pixels are taken first. With I = |fg| minus the foreground taken so far and U = |fg|
    plus the background taken so far, the Lovasz gradient of the Jaccard loss is 1/U for a
    foreground pixel and I / (U (U - 1)) for a background one (1 for the first background pixel of
    a class without foreground). A level's b background pixels share the sum of theirs,
    I b / (U0 (U0 + b)) with U0 = U before them, which telescopes. Each pixel's gradient depends
    on its level only, so the loss is sum over levels of (sum of errors) x gradient: exact
    when no two errors of a class share a level, and within 2 / L of the sorted value otherwise
    (both are Lovasz extensions of errors at most 1 / L apart, with gradients summing to <= 1).
    """
    fg_counts, bg_counts = counts[..., 0, :], counts[..., 1, :]
    fg_total = ops.sum(fg_counts, axis=-1, keepdims=True)
    # Counted from the top level down: what lies in the levels above each one.
    fg_above = ops.flip(ops.cumsum(ops.flip(fg_counts, axis=-1), axis=-1), axis=-1) - fg_counts
    bg_above = ops.flip(ops.cumsum(ops.flip(bg_counts, axis=-1), axis=-1), axis=-1) - bg_counts
    union_before = fg_total + bg_above
    fg_grad = ops.divide_no_nan(1.0, union_before)
    intersection = fg_total - fg_above - fg_counts
    bg_level_grad = ops.where(union_before > 0,
                              ops.divide_no_nan(intersection * bg_counts, union_before * (union_before + bg_counts)),
                              ops.minimum(bg_counts, 1.0))
    bg_grad = ops.divide_no_nan(bg_level_grad, bg_counts)
    grads = ops.stop_gradient(ops.stack([fg_grad, bg_grad], axis=-2))
    return ops.sum(sums * grads, axis=(-2, -1))


# Lovasz-Softmax's histograms take one value per pixel and class. Their bin numbers and the
# gradient's look-up (a gather) are compiled with XLA: on CPU-B the gather of 5M values took 24 ms
# compiled and 151 ms as TensorFlow's kernel. The bins are counted by TensorFlow's bincount, which has no
# gradient; unsorted_segment_sum, which has one, took 0.37 s on the same values against 0.02 s.


@functools.partial(tf.function, jit_compile=True)
def _error_bins(labels, valid, errors, levels: int, per_image: bool):
    """The histogram bin of each pixel and class [B * H * W * C]: (group, class, foreground (0) or
    background (1), error level), numbered in that order; ignored pixels get one more bin."""
    num_classes = errors.shape[-1]
    batch = tf.shape(errors)[0]
    fg = tf.cast(tf.equal(labels[..., None], tf.range(num_classes)), tf.int32)
    level = tf.minimum(tf.cast(errors * levels, tf.int32), levels - 1)
    bins = tf.range(num_classes) * (2 * levels) + (1 - fg) * levels + level
    if per_image:
        bins += tf.reshape(tf.range(batch) * (num_classes * 2 * levels), [-1, 1, 1, 1])
    total = (batch if per_image else 1) * num_classes * 2 * levels
    is_valid = tf.cast(valid[..., None] > 0, tf.int32)
    return tf.reshape(bins * is_valid + total * (1 - is_valid), [-1])


@functools.partial(tf.function, jit_compile=True)
def _gather(values, indices):
    return tf.gather(values, indices)


def _bin_sums(bins, values, length: int):
    """`bincount(bins, weights=values)` over `length` bins, differentiable in `values` (TensorFlow's
    bincount has no gradient: it is a look-up of each value's bin)."""
    @tf.custom_gradient
    def sums(values):
        def grad(upstream):
            return _gather(upstream, bins)
        return tf.math.bincount(bins, weights=values, minlength=length, maxlength=length), grad

    return sums(values)


@keras.saving.register_keras_serializable(package="keras_seg")
class LovaszSoftmaxLoss(_SegmentationLoss):
    """Lovasz-Softmax (Berman, Rannen Triki & Blaschko, CVPR 2018): a surrogate of 1 - IoU, convex in the errors.

    For each class c, the errors `|[y = c] - p_c|` of the valid pixels, in decreasing order, are
    weighted by the Lovasz extension's gradient of the Jaccard loss: the increase of
    `|S| / |fg u S|` (fg: the pixels of class c) as each pixel joins the set S of those with larger
    errors. A group's loss is the mean of these per-class values over the classes that count.

    The reference sorts every class's errors. Here they are binned into `levels` equal levels of
    [0, 1] and the gradient is taken level by level (`_lovasz_class_losses`): the value is the
    reference's when no two errors of a class share a level, and within 2 / levels of it otherwise.
    Value and gradient of 8 x 128 x 256 x 19 logits on CPU-B (one process, alternating, median of
    9): 115 ms per batch and 187 ms per image against 1.68 s and 1.50 s sorted (this class's first
    version), cross-entropy 69 ms, Dice 84 ms. The groups, as the reference's `per_image` option:

    - `per_image=False`: every valid pixel of the batch together (the reference's default). The
      histograms are sums over pixels, so under `--accumulate` and replicas the loss and gradient
      are the whole global batch's; like Dice it needs the step's totals (`NEEDS_TOTALS`: a first
      forward pass over the micro-batches), and replicas add 4 x C x `levels` numbers.
    - `per_image=True`: each image alone, then the mean over the images that hold a valid pixel
      (the reference counts an all-ignored image as a 0). A mean over images: accumulation and
      replicas give the whole batch's loss and gradient from the images' count alone.

    Args:
        per_image: bool. One Lovasz per image (True) or one for the whole batch (False).
        classes: `"present"` (the classes in the group's valid labels, the reference's default) or
            `"all"` (every class; an absent class then costs its largest predicted probability).
        levels: int >= 2. Error levels of the histograms.
        class_weights: per-class weights [C] of the mean over the classes that count
            (`sum w_c L_c / sum w_c`), or None (equal weights).
        ignore_index: int. Label of ignored pixels.
    """

    def __init__(self, per_image: bool = False, classes: str = "present", levels: int = 4096, class_weights=None,
                 ignore_index: int = IGNORE_INDEX, name="lovasz_softmax", **kwargs):
        super().__init__(class_weights, ignore_index, name=name, **kwargs)
        if classes not in LOVASZ_CLASSES:
            raise ValueError(f"lovasz classes must be one of {', '.join(LOVASZ_CLASSES)}, got {classes!r}")
        if int(levels) < 2:
            raise ValueError(f"lovasz levels must be >= 2, got {levels}")
        self.per_image, self.classes, self.levels = bool(per_image), classes, int(levels)

    @property
    def NEEDS_TOTALS(self):  # noqa: N802 (the other losses' class attribute)
        return not self.per_image  # the histograms depend on the predictions

    def _histograms(self, y_true, y_pred):
        """Per group (image, or the batch) the error histograms [G, C, 2, levels] (counts, sums), and
        which images hold a valid pixel [B]."""
        labels, valid, logits = _labels_and_logits(y_true, y_pred, self.ignore_index)
        num_classes, batch = logits.shape[-1], ops.shape(logits)[0]
        image_has_valid = ops.max(ops.reshape(valid, (batch, -1)), axis=-1)
        errors = ops.abs(ops.one_hot(labels, num_classes, dtype="float32") - ops.softmax(logits, axis=-1))
        bins = _error_bins(labels, valid, ops.stop_gradient(errors), self.levels, self.per_image)
        shape = ((batch if self.per_image else 1), num_classes, 2, self.levels)
        length = shape[0] * num_classes * 2 * self.levels  # and one bin for the ignored pixels
        counts = tf.math.bincount(bins, minlength=length + 1, maxlength=length + 1, dtype=tf.float32)
        sums = _bin_sums(bins, ops.reshape(errors, (-1,)), length + 1)
        return ops.reshape(counts[:length], shape), ops.reshape(sums[:length], shape), image_has_valid

    def _group_losses(self, counts, sums):
        """Each group's Lovasz [G]: the weighted mean over the classes that count."""
        class_losses = _lovasz_class_losses(counts, sums)
        fg_counts = ops.sum(counts[..., 0, :], axis=-1)
        if self.classes == "present":
            counted = ops.cast(fg_counts > 0, "float32")
        else:  # every class (a group without a valid pixel has losses 0)
            counted = ops.ones_like(fg_counts)
        if self.class_weights is not None:
            counted = counted * ops.convert_to_tensor(self.class_weights)
        return ops.divide_no_nan(ops.sum(counted * class_losses, axis=-1), ops.sum(counted, axis=-1))

    def statistics(self, y_true, y_pred):
        counts, sums, image_has_valid = self._histograms(y_true, y_pred)
        if self.per_image:
            return {"sum": ops.sum(self._group_losses(counts, sums) * image_has_valid),
                    "count": ops.sum(image_has_valid)}
        return {"counts": counts[0], "sums": sums[0]}

    def from_statistics(self, stats):
        if self.per_image:
            return ops.divide_no_nan(stats["sum"], stats["count"])
        return self._group_losses(stats["counts"][None], stats["sums"][None])[0]

    def mask_statistics(self, y_true):
        if not self.per_image:
            return {}  # the histograms hold the predictions
        valid = ops.cast(ops.not_equal(ops.cast(y_true, "int32"), self.ignore_index), "float32")
        return {"count": ops.sum(ops.max(ops.reshape(valid, (ops.shape(valid)[0], -1)), axis=-1))}

    def call(self, y_true, y_pred):
        counts, sums, image_has_valid = self._histograms(y_true, y_pred)
        group_losses = self._group_losses(counts, sums)
        if self.per_image:
            return _per_valid_pixel(group_losses, image_has_valid)  # the mean over images with a valid pixel
        # One value per image, as Dice's (Keras scales non-scalar losses for tf.distribute).
        return ops.zeros_like(image_has_valid) + group_losses[0]

    def get_config(self):
        return {**super().get_config(), "per_image": self.per_image, "classes": self.classes, "levels": self.levels}


@keras.saving.register_keras_serializable(package="keras_seg")
class CombinedLoss(keras.losses.Loss):
    """A weighted sum of losses, e.g. `1.0 * CrossEntropyLoss() + 0.5 * DiceLoss()`.

    Each term reduces itself (over valid pixels, across replicas) before the weighted sum.

    Args:
        losses: list of `(weight, loss)` pairs.
    """

    def __init__(self, losses, name=None, reduction="sum_over_batch_size"):
        if not losses:
            raise ValueError("CombinedLoss needs at least one (weight, loss) pair")
        super().__init__(name=name or "combined_loss", reduction=reduction, dtype="float32")
        self.losses = [(float(weight), loss) for weight, loss in losses]

    def __call__(self, y_true, y_pred, sample_weight=None):
        return sum(weight * loss(y_true, y_pred, sample_weight=sample_weight) for weight, loss in self.losses)

    def call(self, y_true, y_pred):
        raise NotImplementedError("CombinedLoss sums its terms' reduced values: call the loss object itself")

    def statistics(self, y_true, y_pred):
        return {f"{i}": loss.statistics(y_true, y_pred) for i, (_, loss) in enumerate(self.losses)}

    def from_statistics(self, stats):
        return sum(weight * loss.from_statistics(stats[f"{i}"]) for i, (weight, loss) in enumerate(self.losses))

    @property
    def NEEDS_TOTALS(self):  # noqa: N802 (the terms' class attribute)
        return any(loss.NEEDS_TOTALS for _, loss in self.losses)

    def mask_statistics(self, y_true):
        return {f"{i}": loss.mask_statistics(y_true) for i, (_, loss) in enumerate(self.losses)}

    def get_config(self):
        return {
            "name": self.name,
            "losses": [(w, keras.saving.serialize_keras_object(loss)) for w, loss in self.losses],
        }

    @classmethod
    def from_config(cls, config):
        losses = [(w, keras.saving.deserialize_keras_object(loss)) for w, loss in config["losses"]]
        return cls(losses, name=config.get("name"))


LOSSES = {
    "ce": CrossEntropyLoss, "dice": DiceLoss, "focal": FocalLoss, "ohem": OhemCrossEntropyLoss,
    # Lovasz-Softmax's options as names, so that a --loss spec reaches them.
    "lovasz": functools.partial(LovaszSoftmaxLoss, per_image=False, classes="present"),
    "lovasz_image": functools.partial(LovaszSoftmaxLoss, per_image=True, classes="present"),
    "lovasz_all": functools.partial(LovaszSoftmaxLoss, per_image=False, classes="all"),
    "lovasz_image_all": functools.partial(LovaszSoftmaxLoss, per_image=True, classes="all"),
}
_TERM = re.compile(r"^\s*(?:(?P<weight>\d+(?:\.\d*)?|\.\d+)\s*\*\s*)?(?P<name>[a-z_]+)\s*$")
# Short forms accepted for the weighting methods, as on a command line.
_WEIGHTING_ALIASES = {"inverse": "inverse_frequency", "median": "median_frequency"}


def parse_loss_spec(spec: str) -> list:
    """`"ce+0.5*dice"` -> `[(1.0, "ce"), (0.5, "dice")]`; a ValueError names a bad term.

    Terms are joined by `+`, each `name` or `weight*name`, names among `LOSSES`' keys.
    """
    terms = []
    for term in str(spec).split("+"):
        match = _TERM.match(term.lower())
        if not match or match["name"] not in LOSSES:
            raise ValueError(f"bad loss term {term!r} in {spec!r}: use name or weight*name, names {', '.join(LOSSES)}")
        terms.append((float(match["weight"] or 1.0), match["name"]))
    return terms


def resolve_class_weights(class_weights, class_pixel_counts=None, num_classes: int | None = None):
    """Class weights as a float32 array, or None.

    Args:
        class_weights: None or `"none"`; a sequence of weights; or a `compute_class_weights`
            method (`inverse_frequency`, `median_frequency`, `enet`; `inverse` and `median` for
            short), computed from `class_pixel_counts`.
        class_pixel_counts: per-class pixel counts or a `dataset_info.json` dict, for a method.
        num_classes: int or None. When given, the number of weights must match it.
    """
    if class_weights is None or (isinstance(class_weights, str) and class_weights == "none"):
        return None
    if isinstance(class_weights, str):
        method = _WEIGHTING_ALIASES.get(class_weights, class_weights)
        if method not in CLASS_WEIGHTING:
            raise ValueError(
                f"unknown class weighting {class_weights!r}; choose none, {', '.join(CLASS_WEIGHTING)} or give weights"
            )
        if class_pixel_counts is None:
            raise ValueError(f"class_weights={class_weights!r} needs the training split's class pixel counts")
        weights = compute_class_weights(class_pixel_counts, method)
    else:
        weights = _check_class_weights(class_weights)
    if num_classes is not None and len(weights) != num_classes:
        raise ValueError(f"{len(weights)} class weights for {num_classes} classes")
    return weights


def build_loss(
    spec: str,
    class_weights=None,
    ignore_index: int = IGNORE_INDEX,
    num_classes: int | None = None,
    class_pixel_counts=None,
    **loss_args,
):
    """A loss from a short spec: `"ce"`, `"dice"`, `"focal"`, or a weighted sum such as `"ce+dice"`, `"ce+0.5*dice"`.

    Args:
        spec: str. Terms joined by `+`, each `name` or `weight*name` (see `parse_loss_spec`).
        class_weights: per-class weights given to every term: None, a sequence, or a weighting
            method computed from `class_pixel_counts` (see `resolve_class_weights`).
        ignore_index: int. Label of ignored pixels.
        num_classes: int or None. Checks the number of class weights.
        class_pixel_counts: per-class pixel counts or a `dataset_info.json` dict, for a weighting method.
        **loss_args: per-term keyword arguments, by name, e.g. `focal={"gamma": 1.0}`, `dice={"smooth": 0.1}`.

    Returns:
        The loss; a `CombinedLoss` when `spec` has several terms or a weight other than 1.
    """
    terms = parse_loss_spec(spec)
    unknown = set(loss_args) - set(LOSSES)
    if unknown:
        raise ValueError(f"unknown loss options {sorted(unknown)}; options are given per term: {', '.join(LOSSES)}")
    weights = resolve_class_weights(class_weights, class_pixel_counts, num_classes)
    losses = [
        (weight, LOSSES[name](class_weights=weights, ignore_index=ignore_index, **loss_args.get(name, {})))
        for weight, name in terms
    ]
    if len(losses) == 1 and losses[0][0] == 1.0:
        return losses[0][1]
    # A name fit for TensorFlow name scopes: "ce+0.5*dice" -> "ce_0.5_dice".
    return CombinedLoss(losses, name=re.sub(r"[^0-9a-z_.]+", "_", spec.lower()).strip("_"))
