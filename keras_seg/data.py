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
"""

from __future__ import annotations

import os
import random
import re

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
    low, high = (float(v) for v in ratio_range)
    ratio = low + tf.random.stateless_uniform([], seeds[0]) * (high - low)
    shape = tf.shape(image)
    image, mask = _resize(image, mask, keep_ratio_size(shape[0], shape[1], base_scale, ratio))
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


def fit_example(image, mask, size, ignore_index=IGNORE_INDEX):
    """Scale (aspect kept) to fit inside `size`, then pad (centred; mask: ignore) to exactly `size`.

    The rule (`keras_seg.contract.fit_size`) and the centred padding are the "fit" inference contract's.
    """
    shape = tf.shape(image)
    image, mask = _resize(image, mask, fit_size(shape[0], shape[1], size))
    return crop_or_pad_example(image, mask, size, ignore_index)


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

    data_dir = os.fspath(data_dir)
    info = tfrecord.load_dataset_info(data_dir)
    ignore_index = int(info["ignore_index"])
    paths = _shard_paths(data_dir, split, info)
    if tf.executing_eagerly():
        _check_first_record(paths)

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

    records = _PipelineRecords(paths, pipeline_id, num_pipelines, num_parallel_calls)
    if training and repeat:
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

    def to_float(image, mask):
        return tf.cast(image, tf.float32) / 255.0, mask

    if training and resize_mode in ("crop", "scale_crop"):
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
