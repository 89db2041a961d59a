"""A TensorFlow Datasets builder with an image and a segmentation mask.

The builder is prepared as TFDS does it (`--data-dir`, `--manual-dir` for datasets that must be
downloaded by hand, such as Cityscapes). For `cityscapes/...` builders the masks are raw labelIds
and the Cityscapes label spaces apply (keys `image_left` / `segmentation_label` by default);
other builders hold class indices, described with `--classes` or `--num-classes`.
"""

from __future__ import annotations

from keras_seg.labels import CITYSCAPES_LABEL_SPACES, cityscapes_label_space
from pipelines.common import ConversionError, Loaded, Sample, map_to_label_space
from pipelines.folder import build_folder_label_space


class TfdsSource:
    name = "tfds"

    def __init__(self, tfds_name, label_space=None, image_key=None, mask_key=None, data_dir=None, manual_dir=None,
                 classes=None, num_classes=None, splits=None):
        if not tfds_name:
            raise ConversionError("tfds", "--tfds-name is required (e.g. cityscapes/semantic_segmentation)")
        self.tfds_name = tfds_name
        self.root = f"tfds:{tfds_name}"
        self.is_cityscapes = tfds_name.split("/")[0] == "cityscapes"
        if self.is_cityscapes:
            if label_space not in (None, *CITYSCAPES_LABEL_SPACES):
                raise ConversionError("--label-space", f"choose one of {CITYSCAPES_LABEL_SPACES}, got {label_space!r}")
            self.label_space = cityscapes_label_space(label_space or "trainid")
        else:
            self.label_space, _ = build_folder_label_space(classes, None, num_classes)
        self.image_key = image_key or ("image_left" if self.is_cityscapes else "image")
        self.mask_key = mask_key or ("segmentation_label" if self.is_cityscapes else "segmentation_mask")
        self.requested_splits = list(splits or [])
        self._builder = self._prepare(data_dir, manual_dir)

    def _prepare(self, data_dir, manual_dir):
        from keras_seg.quiet import import_tensorflow

        import_tensorflow()
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder(self.tfds_name, data_dir=data_dir)
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
        except Exception as err:  # noqa: BLE001 - TFDS raises many kinds; one line for the user
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConversionError(self.root, f"TFDS could not prepare the dataset: {first_line}") from err
        features = builder.info.features
        for key in (self.image_key, self.mask_key):
            if key not in features:
                raise ConversionError(self.root, f"has no feature '{key}'; its features are {sorted(features.keys())}")
        return builder

    def __getstate__(self):
        # Workers need only the label space; the builder stays in the main process.
        return {k: v for k, v in self.__dict__.items() if k != "_builder"}

    def list_splits(self):
        # A builder without recorded splits (no metadata, e.g. mocked) takes the names asked for.
        return sorted(self._builder.info.splits.keys()) or self.requested_splits

    def list_samples(self, split):
        return TfdsSplit(self, split)

    def load(self, sample):
        image, mask = sample.payload
        where = f"{self.root}:{sample.name}"
        if image.ndim != 3 or image.shape[-1] not in (1, 3):
            raise ConversionError(where, f"image has shape {image.shape}; expected [H, W, 3]")
        if image.shape[-1] == 1:
            image = image.repeat(3, axis=-1)
        mask = mask[..., 0] if mask.ndim == 3 else mask
        return Loaded(mask=map_to_label_space(mask.astype("uint8"), self.label_space, where), image=image,
                      image_format="png")


class TfdsSplit:
    """The samples of a TFDS split, read lazily in order (a split can be larger than memory).

    Supports `len()`, iteration and slices (`samples[:-100]`, as `--val-fraction` uses), which map
    to TFDS' own split slicing (`train[:-100]`).
    """

    def __init__(self, source, split, start=None, stop=None):
        self.source, self.split = source, split
        bounds = ("" if start is None else str(start), "" if stop is None else str(stop))
        self.spec = split if bounds == ("", "") else f"{split}[{bounds[0]}:{bounds[1]}]"
        cardinality = int(self._dataset().cardinality())
        self.length = cardinality if cardinality >= 0 else int(source._builder.info.splits[self.spec].num_examples)

    def _dataset(self):
        return self.source._builder.as_dataset(split=self.spec, shuffle_files=False)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not isinstance(index, slice) or index.step not in (None, 1) or self.spec != self.split:
            raise ConversionError(self.source.root, "TFDS splits are read in order: --shuffle-seed is not supported")
        return TfdsSplit(self.source, self.split, index.start, index.stop)

    def __iter__(self):
        import tensorflow_datasets as tfds

        for index, example in enumerate(tfds.as_numpy(self._dataset())):
            image_id = example.get("image_id", b"")
            name = image_id.decode() if isinstance(image_id, bytes) and image_id else f"{self.spec}/{index:06d}"
            yield Sample(name, payload=(example[self.source.image_key], example[self.source.mask_key]))
