"""Reading keras-seg TFRecord directories into `tf.data` pipelines of (image, mask) batches.

Two layers, after TF Model Garden's decoder / parser split:

* decoding: `decode_record` turns one serialized record into (image uint8 [H, W, 3],
  mask uint8 [H, W]); it knows the record format (`keras_seg.tfrecord`) and nothing else.
* sizing: `resize_example`, `crop_or_pad_example`, `fit_example` bring a decoded example to a
  fixed size; `random_scale_crop_example` rescales the whole example by a random ratio of a base
  scale and crops it (MMSegmentation's RandomResize + RandomCrop). Masks are only ever resampled
  with nearest neighbour, and padding in a mask is the ignore index, never a class.

`build_dataset` assembles them: shards -> parallel interleave -> (shuffle) -> parallel decode and
sizing -> (cache) -> (repeat) -> batch -> prefetch. Batches are `(images, masks)`: images float32
in [0, 1], [B, H, W, 3]; masks uint8 [B, H, W] with class indices and the ignore index (255).
Random rescaling of the whole image ("scale_crop") is done here, where the whole image is; flips,
rotation, photometric changes, blur and occlusion run on the accelerator, on whole batches, in
`keras_seg.augment` (whose own scale is for the other modes).

Class-uniform sampling (`class_uniform`, `ClassUniformPlan`) replaces the training stream with one
that fetches examples by their place in the split, as the split's class index
(`keras_seg.tfrecord.load_class_index`) says where each record is and which classes it holds.
"""

from __future__ import annotations

import os
import random
import re

import numpy as np
import tensorflow as tf

from keras_seg import tfrecord
from keras_seg.contract import fit_size, keep_ratio_size, resize_uint8
from keras_seg.labels import IGNORE_INDEX

RESIZE_MODES = ("resize", "crop", "fit", "scale_crop")
CROP_ATTEMPTS = 10  # MMSegmentation's RandomCrop tries this many crops against cat_max_ratio

_READ_BUFFER_BYTES = 8 * 1024 * 1024


# --------------------------------------------------------------------------- decoding


def decode_record(serialized):
    """One serialized record -> (image uint8 [H, W, 3], mask uint8 [H, W]).

    Raises (at run time) `InvalidArgumentError` naming the missing feature for a record that is
    not in the keras-seg format, and when the mask's size differs from the image's.
    """
    features = tf.io.parse_single_example(serialized, tfrecord.feature_spec())
    encoded = features[tfrecord.IMAGE_ENCODED]
    # TF's JPEG default is libjpeg's fast integer DCT; the accurate one gives the pixels that
    # PIL, OpenCV and tfrecord.decode_arrays give, i.e. what the model sees at inference.
    image = tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_png(encoded, channels=3),
    )
    image = tf.ensure_shape(image, [None, None, 3])
    mask = tf.io.decode_png(features[tfrecord.MASK_ENCODED], channels=1, dtype=tf.uint8)[..., 0]
    with tf.control_dependencies([
        tf.debugging.assert_equal(tf.shape(image)[:2], tf.shape(mask),
                                  message="mask and image sizes differ in a record")
    ]):
        mask = tf.identity(mask)
    return image, mask


# --------------------------------------------------------------------------- sizing


def _size_differs(image, size):
    shape = tf.shape(image)
    return tf.logical_or(shape[0] != size[0], shape[1] != size[1])


def _resize(image, mask, size):
    def resize():
        resized_mask = tf.image.resize(mask[..., None], size, method="nearest")[..., 0]
        return resize_uint8(image, size), resized_mask

    # Same size (e.g. 256x256 pairs at image_size 256x256): no resampling at all.
    return tf.cond(_size_differs(image, size), resize, lambda: (image, mask))


def resize_example(image, mask, size):
    """Resize to `size` (aspect not kept): image bilinear (antialiased), mask nearest neighbour.

    Args:
        image: uint8 [H, W, 3].
        mask: uint8 [H, W].
        size: (height, width), Python ints.
    """
    image, mask = _resize(image, mask, size)
    return tf.ensure_shape(image, [*size, 3]), tf.ensure_shape(mask, list(size))


def _pad_to_at_least(image, mask, size, ignore_index):
    """Pad (centred) to at least `size`: image with 0, mask with `ignore_index`."""
    shape = tf.shape(image)
    pad_h = tf.maximum(size[0] - shape[0], 0)
    pad_w = tf.maximum(size[1] - shape[1], 0)
    paddings = [[pad_h // 2, pad_h - pad_h // 2], [pad_w // 2, pad_w - pad_w // 2]]
    image = tf.pad(image, paddings + [[0, 0]])
    mask = tf.pad(mask, paddings, constant_values=tf.cast(ignore_index, mask.dtype))
    return image, mask


def crop_or_pad_example(image, mask, size, ignore_index=IGNORE_INDEX, seed=None):
    """Pad to at least `size` (mask: ignore), then crop `size`: at random with `seed`, else centred.

    Args:
        image: uint8 [H, W, 3].
        mask: uint8 [H, W].
        size: (height, width).
        ignore_index: mask value of the padding.
        seed: None for a centre crop, or an int [2] tensor for a stateless random crop.
    """
    image, mask = _pad_to_at_least(image, mask, size, ignore_index)
    shape = tf.shape(image)
    room = tf.stack([shape[0] - size[0], shape[1] - size[1]])
    offset = room // 2 if seed is None else _crop_offset(room, seed)
    image = image[offset[0]:offset[0] + size[0], offset[1]:offset[1] + size[1]]
    mask = mask[offset[0]:offset[0] + size[0], offset[1]:offset[1] + size[1]]
    return tf.ensure_shape(image, [*size, 3]), tf.ensure_shape(mask, list(size))


def _crop_offset(room, seed):
    offset = tf.cast(tf.floor(tf.random.stateless_uniform([2], seed) * tf.cast(room + 1, tf.float32)), tf.int32)
    return tf.minimum(offset, room)


def _crop_is_varied(mask, ignore_index, cat_max_ratio):
    """MMSegmentation's cat_max_ratio test: more than one class, and none over that share of the labelled pixels."""
    counts = tf.math.bincount(tf.reshape(tf.cast(mask, tf.int32), [-1]), minlength=256, maxlength=256)
    counts = tf.tensor_scatter_nd_update(counts, [[ignore_index]], [0])
    classes = tf.reduce_sum(tf.cast(counts > 0, tf.int32))
    return tf.logical_and(classes > 1, tf.cast(tf.reduce_max(counts), tf.float32)
                          < cat_max_ratio * tf.cast(tf.reduce_sum(counts), tf.float32))


def random_scale_crop_example(image, mask, size, base_scale, ratio_range, seed, ignore_index=IGNORE_INDEX,
                              cat_max_ratio=1.0):
    """Rescale the whole example by a random ratio of `base_scale` (aspect kept), then crop `size` at random.

    As MMSegmentation's RandomResize(scale, ratio_range, keep_ratio=True) + RandomCrop(cat_max_ratio):
    the ratio r is drawn uniformly from `ratio_range`; the example is resized (image bilinear,
    antialiased; mask nearest) so that its long side is at most max(base_scale) x r and its short
    side at most min(base_scale) x r; it is padded to at least `size` (image 0, mask ignore) and
    cropped. With `cat_max_ratio` < 1, up to 10 crops are drawn until one holds more than one class
    and no class over that share of its labelled pixels (else the last is kept).

    Args:
        image: uint8 [H, W, 3]; mask: uint8 [H, W].
        size: (height, width) of the crop.
        base_scale: (height, width) the ratios multiply.
        ratio_range: (low, high).
        seed: int [2] tensor; the result is a function of it.
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), CROP_ATTEMPTS + 1, alg="philox")
    image, mask = _rescale_at_random(image, mask, base_scale, ratio_range, seeds[0])
    image, mask = _pad_to_at_least(image, mask, size, ignore_index)
    shape = tf.shape(image)
    room = tf.stack([shape[0] - size[0], shape[1] - size[1]])

    def crop(offset):
        return (image[offset[0]:offset[0] + size[0], offset[1]:offset[1] + size[1]],
                mask[offset[0]:offset[0] + size[0], offset[1]:offset[1] + size[1]])

    offset = _crop_offset(room, seeds[1])
    if cat_max_ratio < 1.0:
        def next_attempt(attempt, offset):
            return attempt + 1, _crop_offset(room, tf.gather(seeds, attempt + 1))

        def keep_trying(attempt, offset):
            return tf.logical_and(attempt < CROP_ATTEMPTS - 1,
                                  tf.logical_not(_crop_is_varied(crop(offset)[1], ignore_index, cat_max_ratio)))

        _, offset = tf.while_loop(keep_trying, next_attempt, (tf.constant(0), offset))
    image, mask = crop(offset)
    return tf.ensure_shape(image, [*size, 3]), tf.ensure_shape(mask, list(size))


def _rescale_at_random(image, mask, base_scale, ratio_range, seed):
    """The whole example resized to `base_scale` x a ratio drawn uniformly from `ratio_range` (aspect kept)."""
    low, high = (float(v) for v in ratio_range)
    ratio = low + tf.random.stateless_uniform([], seed) * (high - low)
    shape = tf.shape(image)
    return _resize(image, mask, keep_ratio_size(shape[0], shape[1], base_scale, ratio))


def fit_example(image, mask, size, ignore_index=IGNORE_INDEX):
    """Scale (aspect kept) to fit inside `size`, then pad (centred; mask: ignore) to exactly `size`.

    The rule (`keras_seg.contract.fit_size`) and the centred padding are the "fit" inference contract's.
    """
    shape = tf.shape(image)
    image, mask = _resize(image, mask, fit_size(shape[0], shape[1], size))
    return crop_or_pad_example(image, mask, size, ignore_index)


# --------------------------------------------------------------------------- class-uniform sampling


def _cell_span(cell, side, grid):
    """[start, end) of the pixels p of a side of `side` pixels in grid line `cell`: p * grid // side == cell."""
    return (cell * side + grid - 1) // grid, ((cell + 1) * side + grid - 1) // grid


def class_centre(mask, class_id, cells, seed, grid=tfrecord.CLASS_INDEX_GRID):
    """A pixel (row, column) of class `class_id` in `mask` for a crop to centre on, int32 [2].

    A cell is drawn uniformly among the set bits of `cells` (the class index's grid cells of the
    class, `keras_seg.tfrecord`; the grid is laid over this mask whatever its size, so it serves a
    rescaled example too), then a core pixel of the class in it (its 3x3 neighbourhood inside the
    mask all of the class, the index's rule) uniformly; failing one (a rescale can thin a class
    out), any pixel of the class in the cell; failing that, the cell's centre. Only the cell and a
    one-pixel margin are read.

    Args:
        mask: uint8 [H, W].
        class_id: int32 scalar.
        cells: int64 scalar, the class's cell bits (bit grid * row + column).
        seed: int [2] tensor; the result is a function of it.
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2, alg="philox")
    shifts = tf.range(grid * grid, dtype=tf.int64)
    bits = tf.bitwise.bitwise_and(tf.bitwise.right_shift(tf.cast(cells, tf.int64), shifts), 1) > 0
    cell = tf.argmax(tf.where(bits, tf.random.stateless_uniform([grid * grid], seeds[0]), -1.0), output_type=tf.int32)
    shape = tf.shape(mask)
    row0, row1 = _cell_span(cell // grid, shape[0], grid)
    col0, col1 = _cell_span(cell % grid, shape[1], grid)
    top, left = tf.maximum(row0 - 1, 0), tf.maximum(col0 - 1, 0)
    bottom, right = tf.minimum(row1 + 1, shape[0]), tf.minimum(col1 + 1, shape[1])
    is_class = tf.equal(tf.cast(mask[top:bottom, left:right], tf.int32), tf.cast(class_id, tf.int32))
    # min over the 3x3 neighbourhood: SAME pooling leaves out what lies outside the window, which
    # reaches one pixel past the cell, so a cell pixel's neighbourhood is the one in the whole mask
    core = -tf.nn.max_pool2d(-tf.cast(is_class, tf.float32)[None, :, :, None], 3, 1, "SAME")[0, :, :, 0] > 0.5
    rows = tf.range(top, bottom)[:, None]
    cols = tf.range(left, right)[None, :]
    in_cell = (rows >= row0) & (rows < row1) & (cols >= col0) & (cols < col1)
    core, is_class = core & in_cell, is_class & in_cell
    candidates = tf.where(tf.reduce_any(core), core, is_class)
    draws = tf.random.stateless_uniform(tf.shape(candidates), seeds[1])
    scores = tf.concat([tf.reshape(tf.where(candidates, draws, -1.0), [-1]), [-0.5]], 0)  # the last: none found
    pick = tf.argmax(scores, output_type=tf.int32)
    width = right - left
    found = tf.stack([top + pick // tf.maximum(width, 1), left + pick % tf.maximum(width, 1)])
    return tf.where(pick < tf.size(candidates), found, tf.stack([(row0 + row1) // 2, (col0 + col1) // 2]))


def crop_centred_example(image, mask, size, centre, ignore_index=IGNORE_INDEX):
    """Pad to at least `size` (centred; mask: ignore), then crop `size` centred on `centre` (row, column
    of the unpadded example), shifted as little as needed to stay inside: the crop holds the centre."""
    shape = tf.shape(image)
    padding = tf.stack([tf.maximum(size[0] - shape[0], 0) // 2, tf.maximum(size[1] - shape[1], 0) // 2])
    image, mask = _pad_to_at_least(image, mask, size, ignore_index)
    shape = tf.shape(image)
    room = tf.stack([shape[0] - size[0], shape[1] - size[1]])
    offset = tf.clip_by_value(tf.cast(centre, tf.int32) + padding - tf.constant([size[0] // 2, size[1] // 2]), 0, room)
    image = image[offset[0]:offset[0] + size[0], offset[1]:offset[1] + size[1]]
    mask = mask[offset[0]:offset[0] + size[0], offset[1]:offset[1] + size[1]]
    return tf.ensure_shape(image, [*size, 3]), tf.ensure_shape(mask, list(size))


class ClassUniformPlan:
    """Which record each position of a class-uniform training stream shows, and why.

    The records are one input pipeline's share of the split in the class index's order (all of it
    with one pipeline). Position k of the stream is, with probability `probability`, a class draw:
    a class uniform among those some record of the share holds, then a record holding it, uniform
    among them; otherwise the natural draw: the record at k's place in pass k // n over the share,
    each pass a permutation of its own. Every draw is a stateless function of (seed, k), so the
    stream can start at any position.
    """

    BLOCK = 1024  # positions drawn by one call

    def __init__(self, index: tfrecord.ClassIndex, probability, seed, pipeline_id=0, num_pipelines=1):
        records = np.arange(index.num_records)
        # As _PipelineRecords: whole shards when they divide evenly among the pipelines, else every n-th record.
        self.shared_records = num_pipelines > 1 and len(index.shards) % num_pipelines != 0
        if self.shared_records:
            records = records[pipeline_id::num_pipelines]
        elif num_pipelines > 1:
            records = records[index.record_shards() % num_pipelines == pipeline_id]
        if len(records) == 0:
            raise tfrecord.DatasetFormatError(f"{index.directory}: an input pipeline has no records to read")
        self.records = records  # the share's record numbers in the split
        self.cells = index.cells[records].view(np.int64)  # [n, num_classes], the bits as int64
        held = self.cells != 0
        self.classes = np.flatnonzero(held.any(axis=0)).astype(np.int32)
        if len(self.classes) == 0:
            raise tfrecord.DatasetFormatError(f"{index.directory}: no record holds a class (all ignore?): nothing for "
                                              "class-uniform sampling to draw")
        members = [np.flatnonzero(held[:, c]) for c in self.classes]
        self.holders = np.concatenate(members).astype(np.int64)  # share positions holding each class, by class
        self.counts = np.array([len(m) for m in members], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.probability, self.seed = float(probability), int(seed)
        self.pipeline_id, self.num_pipelines = pipeline_id, num_pipelines

    def draw_block(self, block):
        """(positions, records in the share, classes or -1 for a natural draw, the classes' cell bits) of
        the stream's positions block x BLOCK ... (block + 1) x BLOCK - 1 (drawn together: one map call
        for BLOCK examples)."""
        block = tf.cast(block, tf.int64)
        positions = block * self.BLOCK + tf.range(self.BLOCK, dtype=tf.int64)
        n = len(self.records)
        # The natural draw at k: place k % n of pass k // n, a permutation of the share seeded by the pass.
        seeds = tf.stack([tf.fill([self.BLOCK], tf.constant(self.seed + 4, tf.int64)), positions // n,
                          tf.zeros([self.BLOCK], tf.int64)], axis=-1)
        natural = tf.raw_ops.RandomIndexShuffle(index=positions % n, seed=seeds, rounds=4,
                                                max_index=tf.fill([self.BLOCK], tf.constant(n - 1, tf.int64)))
        u = tf.random.stateless_uniform([self.BLOCK, 3], tf.stack([tf.constant(self.seed + 3, tf.int64), block]))
        choice = tf.minimum(tf.cast(u[:, 1] * len(self.classes), tf.int32), len(self.classes) - 1)
        count = tf.gather(self.counts, choice)
        member = tf.minimum(tf.cast(tf.cast(u[:, 2], tf.float64) * tf.cast(count, tf.float64), tf.int64), count - 1)
        by_class = u[:, 0] < self.probability
        records = tf.where(by_class, tf.gather(self.holders, tf.gather(self.starts, choice) + member), natural)
        classes = tf.where(by_class, tf.gather(self.classes, choice), -1)
        held = tf.gather_nd(self.cells, tf.stack([records, tf.cast(tf.maximum(classes, 0), tf.int64)], axis=-1))
        cells = tf.where(by_class, held, tf.zeros([self.BLOCK], tf.int64))
        return positions, records, classes, cells

    def positions(self, start_example):
        """(position, record in the share, class or -1, its cell bits) of the stream from `start_example` on."""
        first_block, offset = divmod(int(start_example), self.BLOCK)
        blocks = tf.data.Dataset.range(first_block, 2**62 // self.BLOCK).map(self.draw_block)
        return blocks.unbatch().skip(offset)

    def first(self, count, start_example=0):
        """numpy (records in the split, classes or -1) of `count` positions from `start_example`."""
        drawn = list(self.positions(start_example).take(count).as_numpy_iterator())
        return (self.records[np.array([d[1] for d in drawn], np.int64)], np.array([d[2] for d in drawn], np.int32))


def _class_uniform_stream(data_dir, index, plan, decode_and_size, finish, cache, start_example, num_parallel_calls,
                          deterministic):
    """The training stream of `plan` (`ClassUniformPlan`): each example fetched by its place in the
    pipeline's share of the split and finished (cropped, made float) by `finish(position, example,
    class, cells)`.

    Random access (`tf.data.experimental.at`) works on an in-memory cache, which reads its input in
    order as far as the highest place asked for (so the first batches wait for most of one pass of
    decoding), and on a map over slices: without a cache, each record is read alone from its byte
    offset in its shard.
    """
    records = plan.records
    record_shards = index.record_shards()
    paths = np.array([os.path.join(data_dir, name) for name in index.shards])
    if cache == "memory":
        # The share's records in order: its shards read through, or every n-th record of all of them.
        shards = np.arange(len(paths)) if plan.shared_records else np.unique(record_shards[records])
        examples = tf.data.Dataset.from_tensor_slices(paths[shards]).flat_map(
            lambda path: tf.data.TFRecordDataset(path, buffer_size=_READ_BUFFER_BYTES))
        if plan.shared_records:
            examples = examples.shard(plan.num_pipelines, plan.pipeline_id)
        examples = examples.map(decode_and_size, num_parallel_calls=num_parallel_calls, deterministic=True).cache()
    else:
        sizes = np.array([os.path.getsize(p) for p in paths], np.int64)
        shards = record_shards[records]
        offsets = index.offsets[records] + 12  # the record, past its frame's length and the length's CRC
        lengths = index.lengths[records]

        def read(path, offset, length, footer):
            # A damaged record is not found by its CRCs here (not read), but fails to decode.
            serialized = tf.data.FixedLengthRecordDataset(path, record_bytes=length, header_bytes=offset,
                                                          footer_bytes=footer).get_single_element()
            return decode_and_size(serialized)

        table = tf.data.Dataset.from_tensor_slices((paths[shards], offsets, lengths, sizes[shards] - offsets - lengths))
        examples = table.map(read, num_parallel_calls=num_parallel_calls, deterministic=True)

    def fetch(position, record, class_id, cells):
        return finish(position, tf.data.experimental.at(examples, record), class_id, cells)

    return plan.positions(start_example).map(fetch, num_parallel_calls=num_parallel_calls,
                                             deterministic=deterministic)


# --------------------------------------------------------------------------- the pipeline


def _shard_paths(data_dir, split, info):
    """Full paths of the split's shards, checked against dataset_info.json and the disk."""
    splits = info["splits"]
    if split not in splits:
        raise tfrecord.DatasetFormatError(
            f"{data_dir}: no split {split!r} in {tfrecord.DATASET_INFO_NAME} (it has: {sorted(splits)})"
        )
    on_disk = tfrecord.existing_shards(data_dir, split)
    listed = splits[split].get("shards") or on_disk
    if not on_disk:
        raise tfrecord.DatasetFormatError(f"{data_dir}: no shards for split {split!r} ({split}-*.tfrecord)")
    missing = sorted(set(listed) - set(on_disk))
    if missing:
        raise tfrecord.DatasetFormatError(
            f"{data_dir}: {tfrecord.DATASET_INFO_NAME} lists shards of {split!r} that are missing: {missing[:5]}"
        )
    if splits[split].get("num_examples", 1) == 0:
        raise tfrecord.DatasetFormatError(f"{data_dir}: split {split!r} has no examples")
    return [os.path.join(data_dir, name) for name in sorted(listed)]


def _cache_path(prefix, split, image_size, resize_mode, training, pipeline_id, num_pipelines):
    """A cache file per split, sizing and input pipeline: one prefix serves train and val alike,
    and a changed image_size or resize_mode never reads the examples cached for another."""
    if image_size is None or (training and resize_mode == "scale_crop"):
        size = "full"  # the decoded originals (scale_crop resizes and crops after the cache)
    else:
        size = f"{image_size[0]}x{image_size[1]}-{resize_mode}"
    name = f"{split}-{size}-{'train' if training else 'eval'}-{pipeline_id}of{num_pipelines}"
    return f"{os.fspath(prefix)}-{name}"


# The sizing part of `_cache_path`'s names, and TensorFlow's files for a cache file NAME: NAME.index and
# NAME.data-00000-of-00001 once complete; while being filled, NAME_0.lockfile and
# NAME_0.data-00000-of-00001.tempstate123... (left behind by a killed run).
_CACHE_SIZING = r"(?:full|\d+x\d+-(?:" + "|".join(RESIZE_MODES) + r"))"
_CACHE_LEFTOVER = r"(?:_\d+)?(?:\.lockfile|\.data-\d+-of-\d+\.tempstate\d*)"


def _cache_names(prefix, splits=None, tail=""):
    """A regex of the file names `_cache_path` gives under `prefix` (followed by `tail`), and no others:
    not those of a prefix that extends this one ("cs-fullres" beside "cs"). Splits: those given, else
    any name without a hyphen."""
    split = "|".join(re.escape(s) for s in splits) if splits else "[^-]+"
    return re.compile(re.escape(os.path.basename(os.fspath(prefix))) + f"-(?:{split})-{_CACHE_SIZING}-(?:train|eval)"
                      + r"-\d+of\d+" + tail)


def claim_file_cache(prefix, log=print, splits=None):
    """Take the file cache under `prefix` for this process, and remove what a killed run left there.

    A run killed while it fills a `tf.data` file cache leaves TensorFlow's `.lockfile` (and a
    partial `tempstate` file) behind, and every later run then fails with "concurrent caching
    iterator". This process holds an exclusive lock on `PREFIX.keras_seg.lock` while it lives (the
    operating system drops it whatever way the process ends), so when the lock is free, no
    keras-seg run is filling these files and what is there is stale.

    Only this prefix's own files are touched (`_cache_names`): another run's under a prefix that
    extends this one ("cs-fullres" beside "cs") is held by that run's own lock. `splits`: the split
    names the run caches (default: any).

    Returns the open lock file: keep it as long as the cache is in use. Raises ValueError when
    another live process holds the prefix.
    """
    import fcntl
    import glob

    prefix = os.fspath(prefix)
    leftover = _cache_names(prefix, splits, _CACHE_LEFTOVER)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    handle = open(f"{prefix}.keras_seg.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ValueError(f"--cache {prefix}: another running process uses this cache prefix; choose another") from None
    for path in sorted(glob.glob(glob.escape(prefix) + "-*")):
        if leftover.fullmatch(os.path.basename(path)) and os.path.isfile(path):
            os.remove(path)
            log(f"removed {path}, left by an interrupted run")
    return handle


def _check_first_record(paths):
    """Fail early, with the file named, when the records are not in the keras-seg format."""
    for path in paths:
        try:
            first = next(iter(tf.data.TFRecordDataset(path).take(1)), None)
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as err:
            raise tfrecord.DatasetFormatError(f"{path}: not a TFRecord file ({err.message.splitlines()[0]})") from err
        if first is not None:
            try:
                tfrecord.decode_example(first.numpy())
            except tfrecord.DatasetFormatError as err:
                raise tfrecord.DatasetFormatError(f"{path}: {err}") from err
            except Exception as err:  # not even a tf.train.Example
                raise tfrecord.DatasetFormatError(f"{path}: records are not tf.train.Example protos ({err})") from err
            return
    raise tfrecord.DatasetFormatError(f"the shards {[os.path.basename(p) for p in paths]} hold no records")


def damaged_shard(data_dir, splits):
    """After a read failed (`tf.errors.DataLossError`): the first damaged record in the shards of `splits`,
    as one line naming the file, the byte offset and how to mend it; None when every shard reads whole.
    Only called on error: it reads every shard."""
    info = tfrecord.load_dataset_info(data_dir)
    for split in dict.fromkeys(splits):
        if split not in info["splits"]:
            continue
        for path in _shard_paths(data_dir, split, info):
            damage = tfrecord.find_damage(path)
            if damage is not None:
                return (f"{path}: {damage}, a damaged or half-copied shard: copy it again, or convert split {split!r} "
                        f"again (tools/make_tfrecords.py ... --split {split} --overwrite)")
    return None


def damaged_data(data_dir, splits, err, cache=None) -> str:
    """After a read failed mid-run (`tf.errors.DataLossError`, or the `InternalError` of a truncated
    cache file): one line saying what is damaged and how to mend it.

    A file of this run's --cache named in the error: delete it (re-reading it, as --resume would,
    meets the same damage; the next run fills the cache again from the shards). Else the first damaged
    shard of `splits` (`damaged_shard`, which reads every shard). Else, when the shards read whole, the
    prefix's cache files are the suspects, to delete; else the error's own first line. The caller adds
    how to go on (--resume from the last checkpoint).
    """
    message = getattr(err, "message", None) or str(err)
    first = re.sub(r"^\{\{[^}]*\}\}\s*", "", message.strip()).splitlines()[0] if message.strip() else type(err).__name__
    caches = _cache_files(cache) if cache not in (None, "memory") else {}
    named = [files for base, files in caches.items()
             if re.search(r"(?<![\w-])" + re.escape(os.path.basename(base)) + r"(?![\w-])", message)]
    if named:
        paths = [path for files in named for path in files]
        return (f"{', '.join(paths)}: a damaged --cache file ({first}): delete {'it' if len(paths) == 1 else 'them'} "
                f"(the next run fills the cache again from {data_dir})")
    found = damaged_shard(data_dir, splits)
    if found is not None:
        return found
    if caches:
        paths = [path for files in caches.values() for path in files]
        return (f"reading {data_dir}: {first}; its shards read whole, so the damage is likely in the --cache {cache} "
                f"files: delete {', '.join(paths)} (the next run fills the cache again)")
    return f"reading {data_dir}: {first}"


def _cache_files(prefix) -> dict:
    """This prefix's finished cache files: {cache path without suffix: [its .index and .data files]}."""
    directory = os.path.dirname(os.path.abspath(os.fspath(prefix)))
    finished = _cache_names(prefix, tail=r"(\.index|\.data-\d+-of-\d+)")
    found = {}
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        match = finished.fullmatch(name)
        if match:
            base = os.path.join(directory, name[:match.start(1)])
            found.setdefault(base, []).append(os.path.join(directory, name))
    return found


class _PipelineRecords:
    """The serialized records one input pipeline reads in one pass over the split.

    Shards are divided among the pipelines when they divide evenly (6 shards, 3 pipelines);
    otherwise (3 shards on 2 pipelines would give one pipeline twice the other's share, and its
    records would be drawn half as often) every pipeline reads the shards in one common order and
    keeps every n-th record, so that the pipelines' records are disjoint, together complete, and
    equal in number to one record in every pass.
    """

    def __init__(self, paths, pipeline_id, num_pipelines, num_parallel_calls):
        self.paths = paths
        self.pipeline_id, self.num_pipelines = pipeline_id, num_pipelines
        self.shard_records = num_pipelines > 1 and len(paths) % num_pipelines != 0
        self.num_parallel_calls = num_parallel_calls

    def one_pass(self, epoch_seed=None):
        """One pass; `epoch_seed` (int or int64 tensor) shuffles the shard order, None keeps it sorted."""
        files = tf.data.Dataset.from_tensor_slices(self.paths)
        if self.num_pipelines > 1 and not self.shard_records:
            files = files.shard(self.num_pipelines, self.pipeline_id)
        if epoch_seed is not None:
            # With record sharding every pipeline must read the same order: the seed has no
            # pipeline term there (see `_training_stream`).
            files = files.shuffle(len(self.paths), seed=epoch_seed)
        ds = files.interleave(
            lambda path: tf.data.TFRecordDataset(path, buffer_size=_READ_BUFFER_BYTES),
            cycle_length=min(len(self.paths), 16), block_length=1,
            num_parallel_calls=self.num_parallel_calls, deterministic=True,
        )
        if self.shard_records:
            ds = ds.shard(self.num_pipelines, self.pipeline_id)
        return ds


def _pass_seed(base, epoch):
    """The seed of pass `epoch`'s shuffles, for use inside the pass's dataset function."""
    # The pass's seeds are the only source of its randomness: the global seed, which TensorFlow
    # would mix in (and which, when it is 0, makes tf.data test a tensor seed as a Python bool),
    # is cleared in the function graph being traced.
    tf.compat.v1.get_default_graph().seed = None
    return tf.cast(base, tf.int64) + tf.cast(epoch, tf.int64) * 1_000_003


def _training_stream(records, decode_and_size, cache_file, common_seed, seed, shuffle_buffer, start_example,
                     num_parallel_calls):
    """An endless stream of decoded, sized training examples, a fixed function of `seed`.

    Pass e over the data is shuffled with seeds made from (seed, e), so the stream can be started
    at any position: the passes before it are skipped without being read, and the records of the
    pass it falls in are skipped before decoding (or, with a cache, after it). This is what makes
    a resumed run exact: `tf.distribute`'s distributed iterators cannot be saved in a checkpoint.
    """
    # `seed` is this pipeline's own; the shard order is common to the pipelines when they share records.
    file_seed = common_seed if records.shard_records else seed
    if cache_file is None:
        def one_pass(epoch):
            shuffled = records.one_pass(_pass_seed(file_seed, epoch))
            return shuffled.shuffle(shuffle_buffer, seed=_pass_seed(seed + 1, epoch))
    else:
        # The cache holds the decoded examples in the shards' sorted order; each pass shuffles them.
        cached = records.one_pass().map(decode_and_size, num_parallel_calls=num_parallel_calls,
                                        deterministic=True).cache(cache_file)

        def one_pass(epoch):
            return cached.shuffle(shuffle_buffer, seed=_pass_seed(seed + 1, epoch))

    first_pass, offset = 0, 0
    if start_example:
        per_pass = int(records.one_pass().reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))
        if per_pass == 0:
            raise tfrecord.DatasetFormatError("an input pipeline has no records to read")
        first_pass, offset = divmod(int(start_example), per_pass)
    ds = tf.data.Dataset.range(first_pass, 2**62).flat_map(one_pass).skip(offset)
    if cache_file is None:
        ds = ds.map(decode_and_size, num_parallel_calls=num_parallel_calls, deterministic=True)
    return ds


def build_dataset(
    data_dir,
    split,
    *,
    training,
    batch_size,
    image_size=None,
    resize_mode="resize",
    base_scale=None,
    ratio_range=(0.5, 2.0),
    cat_max_ratio=1.0,
    class_uniform=0.0,
    shuffle_seed=None,
    shuffle_buffer=512,
    cache=None,
    repeat=False,
    drop_remainder=None,
    input_context=None,
    start_example=0,
    num_parallel_calls=tf.data.AUTOTUNE,
    deterministic=None,
    prefetch=tf.data.AUTOTUNE,
):
    """A `tf.data.Dataset` of `(images, masks)` batches from a TFRecord directory.

    Args:
        data_dir: a directory written by `tools/make_tfrecords.py` (with `dataset_info.json`).
        split: split name, e.g. "train" or "val".
        training: shuffle, random crops (resize_mode="crop"), and whole batches only.
        batch_size: examples per batch; the global batch size when `input_context` is given.
        image_size: (height, width) of every example; required when training. None (evaluation
            only) keeps each image's own size; examples of different sizes in one batch are then
            padded at the bottom / right (image 0, mask ignore), so use batch_size=1 for mixed sizes.
        resize_mode: how an example is brought to `image_size`:
            "resize" stretches it (image bilinear, mask nearest);
            "crop" pads it to at least `image_size` (mask: ignore), then crops (random when
            training, centred otherwise);
            "fit" keeps the aspect, scaling it to fit inside `image_size`, and pads the rest;
            "scale_crop" (training) rescales the whole example by a random ratio of `base_scale`
            and crops `image_size` at random (`random_scale_crop_example`); when not training, it
            rescales to `base_scale` (aspect kept) and crops the centre.
        base_scale, ratio_range, cat_max_ratio: "scale_crop"'s (see `random_scale_crop_example`).
        class_uniform: the share P of training examples drawn class-uniformly (needs training, repeat,
            the split's class index, and cache None or "memory"; 0: off). Each position of the stream
            is, with probability P, a class uniform among those the split holds, then a record holding
            it, uniform among them, cropped ("crop", "scale_crop") centred on a pixel of the class
            (`class_centre`; cat_max_ratio does not apply to it); else a natural draw, each pass a
            permutation of the split. In "resize" and "fit" there is no crop: the draw picks the
            record only. Records are read by their place in the shards (`ClassUniformPlan`), from
            the memory cache when there is one; start_example is exact as without.
        shuffle_seed: seed of the shard and example shuffles and of random crops (None: random).
        shuffle_buffer: examples in the shuffle buffer (records before decoding; decoded examples
            when cached).
        cache: None, "memory", or a file path prefix: keep the decoded, sized examples (uint8) after
            the first pass, so later epochs skip reading and decoding ("scale_crop" training:
            the decoded examples at their original size; the random rescale and crop come after
            the cache). The file name adds the split, the sizing and the input pipeline to the
            prefix, so one prefix serves all.
        repeat: repeat indefinitely (reshuffled each epoch).
        drop_remainder: drop a last partial batch; default: `training` (fixed shapes for XLA).
        input_context: `tf.distribute.InputContext`, as passed by
            `strategy.distribute_datasets_from_function`: the pipeline reads its share of the
            shards (or records) and batches per replica. See `distribute_dataset`.
        start_example: with training and repeat: the position in this pipeline's stream of examples
            to start at. The training stream is a fixed function of `shuffle_seed` (each pass over
            the data is shuffled by a seed made from the pass number), so starting at position k
            gives exactly the examples, crops and order that the stream begun at 0 gives after k
            examples: a resumed run continues the stream it interrupted. Whole passes before k are
            not read; the rest of the pass k falls in is read, but not decoded (unless cached).
        num_parallel_calls: parallelism of interleave and decoding.
        deterministic: keep element order fixed given the seed; default True when `shuffle_seed`
            is set or not training, else False (a little faster).
        prefetch: batches prefetched (AUTOTUNE by default; 0 for none).

    Returns:
        A dataset of (images float32 [B, H, W, 3] in [0, 1], masks uint8 [B, H, W]); 255 in the
        mask (the directory's ignore index) marks pixels without a label.

    Raises:
        tfrecord.DatasetFormatError: missing directory or `dataset_info.json`, unknown split, no
            shards, or records that are not in the keras-seg format.
        ValueError: bad arguments.
    """
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    if image_size is None and training:
        raise ValueError("training batches need a fixed image_size=(height, width)")
    if image_size is not None:
        image_size = tuple(int(v) for v in image_size)
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"image_size must be (height, width), got {image_size}")
    if resize_mode == "scale_crop":
        if base_scale is None or len(base_scale) != 2 or min(base_scale) < 1:
            raise ValueError(f"resize_mode 'scale_crop' needs base_scale=(height, width), got {base_scale}")
        base_scale = tuple(int(v) for v in base_scale)
        if not 0.0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {ratio_range}")
        if not 0.0 < cat_max_ratio <= 1.0:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if cache not in (None, "memory") and not isinstance(cache, (str, os.PathLike)):
        raise ValueError(f"cache must be None, 'memory' or a file path, got {cache!r}")
    if not 0.0 <= class_uniform <= 1.0:
        raise ValueError(f"class_uniform must be a share in [0, 1], got {class_uniform}")
    if class_uniform and not (training and repeat):
        raise ValueError("class_uniform needs training=True and repeat=True (it draws a training stream)")
    if class_uniform and cache not in (None, "memory"):
        raise ValueError(f"class_uniform reads examples by their place in the split: cache must be None or 'memory' "
                         f"(a file cache is read in order only), got {cache!r}")

    data_dir = os.fspath(data_dir)
    info = tfrecord.load_dataset_info(data_dir)
    ignore_index = int(info["ignore_index"])
    paths = _shard_paths(data_dir, split, info)
    if tf.executing_eagerly():
        _check_first_record(paths)
    class_index = tfrecord.load_class_index(data_dir, split, info) if class_uniform else None

    if deterministic is None:
        deterministic = shuffle_seed is not None or not training
    if shuffle_seed is None:
        shuffle_seed = random.randrange(2**30)
    drop_remainder = training if drop_remainder is None else drop_remainder

    per_replica_batch = batch_size
    pipeline_id, num_pipelines = 0, 1
    if input_context is not None:
        per_replica_batch = input_context.get_per_replica_batch_size(batch_size)
        pipeline_id, num_pipelines = input_context.input_pipeline_id, input_context.num_input_pipelines
    seed = shuffle_seed + 7919 * pipeline_id  # pipelines shuffle and crop differently
    cache_file = None
    if cache is not None:
        cache_file = "" if cache == "memory" else _cache_path(cache, split, image_size, resize_mode, training,
                                                              pipeline_id, num_pipelines)
    if start_example and not (training and repeat):
        raise ValueError("start_example needs training=True and repeat=True (a resumable training stream)")

    def decode_and_size(serialized):
        image, mask = decode_record(serialized)
        if image_size is None:
            return image, mask
        if resize_mode == "resize":
            return resize_example(image, mask, image_size)
        if resize_mode == "fit":
            return fit_example(image, mask, image_size, ignore_index)
        if resize_mode == "scale_crop":
            if training:  # rescaled and cropped at random after the cache
                return image, mask
            shape = tf.shape(image)
            image, mask = _resize(image, mask, keep_ratio_size(shape[0], shape[1], base_scale))
            return crop_or_pad_example(image, mask, image_size, ignore_index)
        if training:  # "crop": padded here, randomly cropped after the cache
            return _pad_to_at_least(image, mask, image_size, ignore_index)
        return crop_or_pad_example(image, mask, image_size, ignore_index)

    def to_float(image, mask):
        return tf.cast(image, tf.float32) / 255.0, mask

    records = _PipelineRecords(paths, pipeline_id, num_pipelines, num_parallel_calls)
    if class_uniform:
        def decode_before_crop(serialized):  # crops come after the cache, so the cache keeps whole examples
            return decode_record(serialized) if resize_mode in ("crop", "scale_crop") else decode_and_size(serialized)

        def finish(position, example, class_id, cells):
            image, mask = example
            crop_seed = tf.stack([tf.constant(seed + 2, tf.int64), position])  # as the stream without class draws
            if resize_mode == "crop":
                def crop_on_class():
                    centre = class_centre(mask, class_id, cells, crop_seed)
                    return crop_centred_example(image, mask, image_size, centre, ignore_index)

                image, mask = tf.cond(
                    class_id >= 0, crop_on_class,
                    lambda: crop_or_pad_example(image, mask, image_size, ignore_index, seed=crop_seed))
            elif resize_mode == "scale_crop":
                def centred_on_class():
                    seeds = tf.random.experimental.stateless_split(crop_seed, 2, alg="philox")
                    scaled_image, scaled_mask = _rescale_at_random(image, mask, base_scale, ratio_range, seeds[0])
                    centre = class_centre(scaled_mask, class_id, cells, seeds[1])
                    return crop_centred_example(scaled_image, scaled_mask, image_size, centre, ignore_index)

                image, mask = tf.cond(
                    class_id >= 0, centred_on_class,
                    lambda: random_scale_crop_example(image, mask, image_size, base_scale, ratio_range, crop_seed,
                                                      ignore_index, cat_max_ratio))
            return to_float(image, mask)

        plan = ClassUniformPlan(class_index, class_uniform, seed, pipeline_id, num_pipelines)
        ds = _class_uniform_stream(data_dir, class_index, plan, decode_before_crop, finish, cache, start_example,
                                   num_parallel_calls, deterministic)
    elif training and repeat:
        ds = _training_stream(records, decode_and_size, cache_file, shuffle_seed, seed, shuffle_buffer,
                              start_example, num_parallel_calls)
    else:
        ds = records.one_pass(epoch_seed=seed if training else None)
        # Without a cache, shuffle the small serialized records; with one, the decoded examples
        # (the cache is filled in one order, so shuffling must come after it).
        if training and cache is None:
            ds = ds.shuffle(shuffle_buffer, seed=seed + 1, reshuffle_each_iteration=True)
        ds = ds.map(decode_and_size, num_parallel_calls=num_parallel_calls, deterministic=deterministic)
        if cache is not None:
            ds = ds.cache(cache_file)
            if training:
                ds = ds.shuffle(shuffle_buffer, seed=seed + 1, reshuffle_each_iteration=True)
        if repeat:
            ds = ds.repeat()

    if class_uniform:
        pass  # cropped and made float above
    elif training and resize_mode in ("crop", "scale_crop"):
        # Stateless crops keyed by the example's position in the stream: reproducible, different
        # in every epoch, and the same again in a resumed run.
        def random_crop(index, example):
            crop_seed = tf.stack([tf.constant(seed + 2, tf.int64), index])
            if resize_mode == "scale_crop":
                return to_float(*random_scale_crop_example(*example, image_size, base_scale, ratio_range, crop_seed,
                                                           ignore_index, cat_max_ratio))
            return to_float(*crop_or_pad_example(*example, image_size, ignore_index, seed=crop_seed))

        ds = ds.enumerate(start=start_example).map(random_crop, num_parallel_calls=num_parallel_calls,
                                                   deterministic=deterministic)
    else:
        ds = ds.map(to_float, num_parallel_calls=num_parallel_calls, deterministic=deterministic)
    if image_size is None and per_replica_batch > 1:
        ds = ds.padded_batch(
            per_replica_batch,
            padded_shapes=([None, None, 3], [None, None]),
            padding_values=(0.0, tf.constant(ignore_index, tf.uint8)),
            drop_remainder=drop_remainder,
        )
    else:
        ds = ds.batch(per_replica_batch, drop_remainder=drop_remainder, num_parallel_calls=num_parallel_calls,
                      deterministic=deterministic)
    if prefetch:
        ds = ds.prefetch(prefetch)
    return ds


def distribute_dataset(strategy, data_dir, split, *, batch_size, **kwargs):
    """`build_dataset` for every input pipeline of a `tf.distribute` strategy.

    Args:
        strategy: a `tf.distribute.Strategy`.
        data_dir, split: as `build_dataset`.
        batch_size: the global batch size (split evenly over the replicas; must divide evenly).
        **kwargs: the other arguments of `build_dataset`.

    Returns:
        A `tf.distribute.DistributedDataset` whose elements hold one per-replica batch per replica.
    """
    if batch_size % strategy.num_replicas_in_sync:
        raise ValueError(
            f"global batch_size {batch_size} does not split over {strategy.num_replicas_in_sync} replicas"
        )

    def dataset_fn(input_context):
        return build_dataset(data_dir, split, batch_size=batch_size, input_context=input_context, **kwargs)

    return strategy.distribute_datasets_from_function(dataset_fn)
