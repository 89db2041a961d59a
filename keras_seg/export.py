"""Export a run's best model as a SavedModel for TF Serving.

    python -m keras_seg.export --run runs/NAME --output DIR [--name NAME --version N]

writes `DIR/NAME/VERSION/` (TF Serving's layout: it serves the highest numbered version) with:

* `serving_default`: `images`, tf.string [N], encoded JPEG or PNG bytes (one size per call) ->
  `class_ids` int32 [N, H, W] and `confidence` float32 [N, H, W] (the top softmax probability)
  at the images' own size;
* `segment_uint8`: `images`, uint8 [N, H, W, 3] RGB -> the same outputs;
* `probabilities`: `images`, uint8 [N, H, W, 3] -> `probabilities`, float32 softmax [N, H, W, C];
* `model_probabilities`: `images`, float32 [N, h, w, 3] in [0, 1] at the model's input size ->
  softmax (the bare model, for flip and multi-scale averaging);
* `assets/labels.json`: class names, colours, ignore index, label space, preset, and under
  "inference" the run's inference contract, which the first three signatures follow
  (`keras_seg.contract`: whole image at the training scale, or sliding windows).

The graph is `keras_seg.inference.SegmentationModule` around the model rebuilt under the float32
policy, so it computes in float32 whatever precision the run trained in, and loading it needs
TensorFlow only. A version is written under a temporary name (TF Serving ignores folders that are
not numbers) and renamed when complete, so a server watching DIR/NAME never loads half of one.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile

from keras_seg.files import write_json_atomically


class ExportError(ValueError):
    """A bad argument or destination, said in one line."""


def next_version(model_dir: str) -> int:
    """1 + the highest numbered version folder in `model_dir` (1 when there is none)."""
    if not os.path.isdir(model_dir):
        return 1
    versions = [int(name) for name in os.listdir(model_dir) if name.isdigit()]
    return max(versions, default=0) + 1


def export_saved_model(run_dir, output_dir, name=None, version=None, overwrite=False, log=print,
                       progress=False) -> str:
    """Export `run_dir`'s best model to `output_dir/name/version`; returns that directory.

    Args:
        run_dir: a directory written by `keras_seg.train`.
        output_dir: the model base directory that TF Serving's `--model_base_path` points above.
        name: model name (default: the run directory's name).
        version: version number (default: one above the highest present, or 1).
        overwrite: replace an existing version.
        log: where progress lines go.
        progress: show a progress bar over the export's stages (on stderr).

    Raises:
        ExportError: bad name or version, or the version exists and `overwrite` is off.
        keras_seg.inference.InferenceError: not a usable run directory.
    """
    from keras_seg import inference
    from keras_seg.contract import InferenceContract

    run_dir = os.fspath(run_dir)
    name = name or os.path.basename(os.path.normpath(os.path.abspath(run_dir)))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ExportError(f"--name {name!r}: use letters, digits, '_', '.' and '-' (it appears in serving URLs)")
    model_dir = os.path.join(os.fspath(output_dir), name)
    if version is None:
        version = next_version(model_dir)
    if int(version) < 1:
        raise ExportError(f"--version must be >= 1, got {version}")
    final = os.path.join(model_dir, str(int(version)))
    if os.path.exists(final) and not overwrite:
        raise ExportError(f"{final} exists: choose another --version, leave --version out for the next one, "
                          "or --overwrite")

    from tqdm import tqdm

    model, info = inference.load_run_model(run_dir)  # a bad run fails here, before any bar or folder
    bar = tqdm(total=2, desc="export", unit="stage", disable=not progress,
               bar_format="{desc}: {n_fmt}/{total_fmt} stages |{bar}| {postfix} [{elapsed}]")
    os.makedirs(model_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{version}.partial-", dir=model_dir)
    try:
        # The asset is copied from a file named labels.json into the SavedModel's assets/.
        labels_path = os.path.join(staging, "labels", inference.LABELS_NAME)
        os.makedirs(os.path.dirname(labels_path))
        write_json_atomically(labels_path, info)
        module = inference.SegmentationModule(model, InferenceContract.from_dict(info["inference"]),
                                              info["num_classes"], labels_path)
        saved = os.path.join(staging, "saved_model")
        log(f"exporting {run_dir} ({info.get('preset') or info['architecture']}, {info['num_classes']} classes, "
            f"{info['input']}, trained in "
            f"{info.get('trained_precision') or 'float32'}; exported in float32)")
        import tensorflow as tf

        # Serving needs no gradients; tracing them would double the export time.
        options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
        bar.set_postfix_str("tracing the signatures and writing the SavedModel")
        tf.saved_model.save(module, saved, signatures=module.signatures(), options=options)
        bar.update(1)
        bar.set_postfix_str("moving it into place")
        if os.path.exists(final):  # --overwrite: move the old version aside, then swap
            old = os.path.join(staging, "replaced")
            os.replace(final, old)
        os.replace(saved, final)
        bar.update(1)
        bar.set_postfix_str("done")
    finally:
        bar.close()
        shutil.rmtree(staging, ignore_errors=True)
    return final


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_seg.export",
        description="Export a training run's best model as a SavedModel that TF Serving serves "
                    "(DIR/NAME/VERSION), with its labels in assets/labels.json.",
    )
    parser.add_argument("--run", required=True, help="run directory written by keras_seg.train (uses best.keras)")
    parser.add_argument("--output", required=True, metavar="DIR", help="model base directory")
    parser.add_argument("--name", help="model name, the folder under DIR and the name in serving URLs "
                                       "(default: the run directory's name)")
    parser.add_argument("--version", type=int, help="version number (default: one above the highest in DIR/NAME)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DIR/NAME/VERSION")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from keras_seg.quiet import import_tensorflow

    import_tensorflow()
    from keras_seg.inference import InferenceError

    try:
        path = export_saved_model(args.run, args.output, args.name, args.version, args.overwrite,
                                  progress=not args.no_progress)
    except (ExportError, InferenceError, OSError) as err:
        parser.exit(2, f"error: {err}\n")
    name = os.path.basename(os.path.dirname(path))
    base = os.path.abspath(os.path.dirname(path))
    print(f"wrote {path}\n"
          f"signatures: serving_default (encoded JPEG/PNG bytes) and segment_uint8 (uint8 pixels) -> class_ids, "
          f"confidence; probabilities (uint8 pixels) -> softmax; model_probabilities -> the bare model's softmax\n"
          f"serve it: docker run -p 8501:8501 -v {base}:/models/{name} -e MODEL_NAME={name} tensorflow/serving")
    return 0


if __name__ == "__main__":
    sys.exit(main())
