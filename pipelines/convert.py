"""Runs a source reader over its splits and writes sharded TFRecords, each split's class index
(`{split}-class-index.npz`, keras_seg/tfrecord.py) and dataset_info.json.

Work is spread over processes (`workers`) in chunks of consecutive samples: each worker encodes a
chunk into a scratch file of finished TFRecord frames and sends back only the per-sample facts;
this process appends the chunks, in input order, to the shards. The shards are therefore
byte-identical whatever the worker count, and the records' bytes never pass through a pipe.
Nothing is visible under its final name until the whole run has succeeded: shards are written
under temporary names and renamed at the end, and on any error (or Ctrl-C) the temporary files
are removed.
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import os
import shutil
import sys
import tempfile

import cv2
import numpy as np

from keras_seg import tfrecord
from keras_seg.labels import IGNORE_INDEX
from pipelines.common import ConversionError, Loaded, Sample, decode_image


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    """How images are stored. `size` (H, W) or `max_size` (longer side) resize at conversion."""

    size: tuple | None = None
    max_size: int | None = None
    image_format: str = "keep"  # keep | jpeg | png
    jpeg_quality: int = 95


@dataclasses.dataclass
class Encoded:
    """What a worker sends back for one sample: the serialized example, ready to write, and what
    dataset_info.json counts."""

    name: str
    record: bytes | None  # None once a worker has written it to its chunk file
    image_format: str
    height: int
    width: int
    class_counts: np.ndarray  # 256 bins
    cells: np.ndarray  # uint64 [256]: the grid cells holding each mask value (tfrecord.class_cells)
    stats: dict
    framed_length: int = 0  # bytes of its TFRecord frame in the chunk file


@dataclasses.dataclass
class Failed:
    name: str
    problem: str


def _target_size(height, width, options: EncodeOptions):
    if options.size:
        return tuple(options.size)
    if options.max_size and max(height, width) > options.max_size:
        scale = options.max_size / max(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))
    return height, width


def encode_sample(sample: Sample, loaded: Loaded, options: EncodeOptions) -> Encoded:
    """Checks a loaded sample, resizes it if asked, and encodes image and mask."""
    where = sample.image_path or sample.name
    image = loaded.image if loaded.image is not None else decode_image(loaded.image_bytes, where)
    mask = loaded.mask
    if image.shape[:2] != mask.shape[:2]:
        h, w = image.shape[:2]
        mh, mw = mask.shape[:2]
        raise ConversionError(sample.mask_path or where, f"mask is {mw}x{mh} but its image is {w}x{h} (WxH)")
    height, width = _target_size(*image.shape[:2], options)
    resized = (height, width) != image.shape[:2]
    if resized:
        shrink = height * width < image.shape[0] * image.shape[1]
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)  # labels are never blended

    fmt = options.image_format
    if fmt == "keep" and not resized and loaded.image_bytes is not None and loaded.image_format:
        image_bytes, image_format = loaded.image_bytes, loaded.image_format
    else:
        # "keep" re-encodes in the source's own format where it has one, losslessly otherwise.
        image_format = (loaded.image_format or "png") if fmt == "keep" else fmt
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        params = [cv2.IMWRITE_JPEG_QUALITY, options.jpeg_quality] if image_format == "jpeg" else []
        ok, buf = cv2.imencode(".jpg" if image_format == "jpeg" else ".png", bgr, params)
        if not ok:
            raise ConversionError(where, f"could not encode the image as {image_format}")
        image_bytes = buf.tobytes()
    ok, mask_buf = cv2.imencode(".png", np.ascontiguousarray(mask, np.uint8))
    if not ok:
        raise ConversionError(where, "could not encode the mask as PNG")
    return Encoded(
        name=sample.name,
        # Serialized here, in the worker: the writing process only appends bytes to a file.
        record=tfrecord.encode_example(image_bytes, image_format, mask_buf.tobytes(), height, width, sample.name),
        image_format=image_format,
        height=height,
        width=width,
        class_counts=np.bincount(mask.ravel(), minlength=256),
        cells=tfrecord.class_cells(mask),
        stats=loaded.stats,
    )


# --------------------------------------------------------------------------- worker side

_WORKER = {}


def _init_worker(source, options):
    cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would oversubscribe
    _WORKER["source"], _WORKER["options"] = source, options


def _process(sample: Sample):
    try:
        return encode_sample(sample, _WORKER["source"].load(sample), _WORKER["options"])
    except ConversionError as err:
        return Failed(err.where, err.problem)
    except Exception as err:  # noqa: BLE001 - any reader failure is reported against its file
        return Failed(sample.image_path or sample.name, f"{type(err).__name__}: {err}")


def _process_chunk(task):
    """Encodes consecutive samples into one scratch file of TFRecord frames; returns its path and
    the per-sample results, without the records (sending ~30 kB a record back through a pipe cost
    the writing process more CPU than a second worker saved)."""
    samples, scratch_dir = task
    fd, path = tempfile.mkstemp(suffix=".frames", dir=scratch_dir)
    results = []
    with os.fdopen(fd, "wb") as frames:
        for sample in samples:
            result = _process(sample)
            if isinstance(result, Encoded):
                framed = tfrecord.frame_record(result.record)
                frames.write(framed)
                result.record, result.framed_length = None, len(framed)
            results.append(result)
    return path, results


# --------------------------------------------------------------------------- planning


def plan_splits(source, splits=None, val_fraction=None) -> dict:
    """split name -> ordered list of Samples, with `val_fraction` carving val off the end of train."""
    available = list(source.list_splits())
    plan = {}
    if val_fraction is not None:
        if not 0.0 < val_fraction < 1.0:
            raise ConversionError("--val-fraction", f"must be between 0 and 1, got {val_fraction}")
        if "val" in available:
            raise ConversionError(source.root, "already has a 'val' split; --val-fraction is for sources without one")
        if "train" not in available:
            raise ConversionError(source.root, f"--val-fraction splits 'train', but the splits are {available}")
        train = source.list_samples("train")
        n_val = max(1, round(len(train) * val_fraction))
        if n_val >= len(train):
            raise ConversionError(source.root, f"--val-fraction {val_fraction} leaves no training examples")
        # A contiguous block at the end: neighbouring frames (same streets) stay on one side.
        plan["train"], plan["val"] = train[:-n_val], train[-n_val:]
        available.append("val")
    wanted = list(splits) if splits else available
    unknown = [s for s in wanted if s not in available]
    if unknown:
        raise ConversionError(source.root, f"has no split {', '.join(map(repr, unknown))}; its splits are {available}")
    result = {}
    for split in wanted:
        samples = plan[split] if split in plan else source.list_samples(split)
        if not samples:
            raise ConversionError(source.root, f"split '{split}' is empty")
        # TensorFlow Datasets calls it "validation"; training, evaluation and these docs say "val".
        name = "val" if split == "validation" and "val" not in wanted else split
        result[name] = samples
    return result


# --------------------------------------------------------------------------- driver


def convert(
    source,
    output_dir: str,
    splits=None,
    *,
    val_fraction=None,
    workers=None,
    num_shards=None,
    shard_bytes=tfrecord.DEFAULT_SHARD_BYTES,
    options: EncodeOptions = EncodeOptions(),
    overwrite=False,
    skip_bad=False,
    shuffle_seed=None,
    progress=True,
    log=print,
) -> dict:
    """Converts `source` into `output_dir`; returns the written dataset_info dict.

    Raises ConversionError (one line, naming the file and problem) on bad input; in that case
    nothing is left in `output_dir` that was not there before.
    """
    plan = plan_splits(source, splits, val_fraction)
    if shuffle_seed is not None:
        rng = np.random.default_rng(shuffle_seed)
        plan = {split: [samples[i] for i in rng.permutation(len(samples))] for split, samples in plan.items()}

    os.makedirs(output_dir, exist_ok=True)
    existing = None
    if os.path.exists(os.path.join(output_dir, tfrecord.DATASET_INFO_NAME)):
        existing = tfrecord.load_dataset_info(output_dir)
    common = {"source": source.name, **source.label_space.to_json()}
    try:
        tfrecord.merged_dataset_info(existing, common, {})  # label-space clash: fail before any work
    except tfrecord.DatasetFormatError as err:
        raise ConversionError(output_dir, str(err)) from err
    for split in plan:
        present = split in (existing or {}).get("splits", {}) or tfrecord.existing_shards(output_dir, split)
        if present and not overwrite:
            raise ConversionError(output_dir, f"already holds split '{split}'; pass --overwrite to replace it")

    workers = max(1, workers or os.cpu_count() or 1)
    if hasattr(source, "prepare"):
        source.prepare()  # tables every sample needs, built once here and shared by forked workers
    writers, split_infos, split_cells = {}, {}, {}
    pool = scratch_dir = None
    try:
        if workers > 1:
            scratch_dir = tempfile.mkdtemp(prefix=".chunks.", suffix=".partial", dir=output_dir)
            pool = _start_pool(workers, source, options)
        for split, samples in plan.items():
            writer = tfrecord.ShardedWriter(
                output_dir, split, num_examples=len(samples), num_shards=num_shards, shard_bytes=shard_bytes
            )
            writers[split] = writer
            split_infos[split], split_cells[split] = _convert_split(source, split, samples, writer, options, pool,
                                                                    scratch_dir, skip_bad, progress)
            if skip_bad and split_infos[split]["num_examples"] == 0:
                raise ConversionError(source.root, f"every example of split '{split}' was bad; nothing to write")
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if scratch_dir is not None:
            shutil.rmtree(scratch_dir, ignore_errors=True)

    # Everything succeeded: give the shards their names, drop what they replace, index them, then the info.
    for split, writer in writers.items():
        stale = set(tfrecord.existing_shards(output_dir, split))
        names = writer.commit()
        for name in stale - set(names):
            os.remove(os.path.join(output_dir, name))
        split_infos[split]["shards"] = names
        tfrecord.write_class_index(output_dir, split, split_cells[split], writer.locations, names)
        split_infos[split].update(tfrecord.class_index_summary(split, split_cells[split]))
    info = tfrecord.merged_dataset_info(existing, common, split_infos)
    tfrecord.write_dataset_info(output_dir, info)
    for split, split_info in split_infos.items():
        log(_summary_line(split, split_info))
    return info


def _start_pool(workers, source, options):
    """Worker processes, started before this process has imported TensorFlow where possible.

    Forking is the cheapest start (no re-imports), and safe while TensorFlow's threads do not
    exist yet; once they do (TFDS sources, or a caller that imported it), workers come from a
    fork server, a clean process that imports only the readers.
    """
    if "tensorflow" in sys.modules:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["pipelines.convert", type(source).__module__])
    else:
        context = multiprocessing.get_context("fork")
    return context.Pool(workers, _init_worker, (source, options))


def _convert_split(source, split, samples, writer, options, pool, scratch_dir, skip_bad, progress):
    from tqdm import tqdm

    num_classes = source.label_space.num_classes
    counts = np.zeros(256, np.int64)
    cells = []  # per written record: the grid cells holding each class (the class index)
    sizes, formats, stats, skipped = {}, {}, {}, []
    written = position = 0
    bar = tqdm(total=len(samples), desc=f"{split}", unit="img", disable=not progress, file=sys.stderr)
    try:
        if pool is None:
            _init_worker(source, options)
            chunks = ((None, [_process(sample)]) for sample in samples)
        else:
            chunks = _chunked_imap(pool, samples, scratch_dir)
        for frames_path, results in chunks:
            frames = open(frames_path, "rb") if frames_path else None
            try:
                for result in results:
                    position += 1
                    bar.update(1)
                    if isinstance(result, Failed):
                        if not skip_bad:
                            raise ConversionError(result.name, result.problem)
                        skipped.append(f"{result.name}: {result.problem}")
                        continue
                    framed = frames.read(result.framed_length) if frames else tfrecord.frame_record(result.record)
                    writer.write_framed(framed, position - 1)
                    written += 1
                    counts += result.class_counts
                    cells.append(result.cells[:num_classes])
                    key = f"{result.height}x{result.width}"
                    sizes[key] = sizes.get(key, 0) + 1
                    formats[result.image_format] = formats.get(result.image_format, 0) + 1
                    for k, v in result.stats.items():
                        stats[k] = stats.get(k, 0) + v
            finally:
                if frames:
                    frames.close()
                    os.remove(frames_path)
    finally:
        bar.close()
    total_pixels = int(counts.sum())
    info = {
        "num_examples": written,
        "class_pixel_counts": [int(c) for c in counts[:num_classes]],
        "ignored_pixels": int(counts[IGNORE_INDEX]),
        "total_pixels": total_pixels,
        "image_sizes": sizes,
        "image_formats": formats,
        "bytes": writer.bytes_written,
        "skipped": skipped,
    }
    if stats:
        info["source_stats"] = stats
    return info, np.asarray(cells, np.uint64).reshape(-1, num_classes)


def _chunked_imap(pool, samples, scratch_dir, chunk_size=32, window=8):
    """Ordered (frames file, results) per chunk of `chunk_size` consecutive samples.

    Chunks are small so that the workers stay evenly loaded to the end; a list of samples (paths)
    is handed over whole, so that the workers never wait for this process, while a lazily read
    sequence (TFDS: samples carry their pixels) goes `window` chunks at a time, since `imap` reads
    its whole input at once and such a source must not be pulled into memory whole.
    """
    iterator = iter(samples)
    tasks = iter(lambda: list(itertools.islice(iterator, chunk_size)), [])  # chunks until the input ends
    tasks = ((chunk, scratch_dir) for chunk in tasks)
    if isinstance(samples, list):
        yield from pool.imap(_process_chunk, tasks)
        return
    while window_tasks := list(itertools.islice(tasks, window)):
        yield from pool.imap(_process_chunk, window_tasks)


def _summary_line(split, info):
    total = max(1, info["total_pixels"])
    line = (
        f"{split}: {info['num_examples']} examples in {len(info['shards'])} shard(s), "
        f"{info['bytes'] / 1e6:.1f} MB, ignored pixels {100.0 * info['ignored_pixels'] / total:.2f}%"
    )
    unmatched = info.get("source_stats", {}).get("color_unmatched_pixels")
    if unmatched is not None:
        line += f" (of which colour farther than the --max-color-distance: {100.0 * unmatched / total:.2f}%)"
    if info["skipped"]:
        line += f"; skipped {len(info['skipped'])} bad file(s): " + "; ".join(info["skipped"][:3])
    return line
