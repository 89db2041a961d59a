"""Export a run's best model as a SavedModel for TF Serving, or as a LiteRT / ONNX / OpenVINO file.

    python -m keras_seg.export --run runs/NAME --output DIR [--name NAME --version N]
    python -m keras_seg.export --run runs/NAME --format {litert,onnx,openvino} [--quantize {none,fp16,int8}]
        [--calibration-images N] [--calibration-data DIR] --output DIR

A flag the chosen export would ignore (--name / --version with an artifact format, the calibration
flags without --quantize int8) is refused in one line.

The deployment formats (`export_artifact`, see docs/deploy.md) write `DIR/model.{tflite,onnx,xml}`
and `DIR/labels.json` through Keras' own `Model.export`; by default (`--format saved_model`) it
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
import dataclasses
import os
import re
import shutil
import sys
import tempfile

from keras_seg.files import file_sha256, write_json_atomically


class ExportError(ValueError):
    """A bad argument or destination, said in one line."""


MODEL_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]*"  # safe in TF Serving's URLs and paths


def model_name_from_folder(folder) -> str:
    """A valid model name from a folder's name: accents dropped (städte -> stadte), every other character
    outside letters, digits, '_', '.' and '-' made '_' (ce+dice -> ce_dice, "my run" -> my_run), leading
    '_', '.', '-' removed; "model" when nothing is left. Any folder a user can name a run gives one."""
    import unicodedata

    base = os.path.basename(os.path.normpath(os.path.abspath(os.fspath(folder))))
    ascii_name = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode("ascii")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", ascii_name).lstrip("_.-")
    return name or "model"


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
        name: model name (default: the run directory's name, made valid by `model_name_from_folder`).
        version: version number (default: one above the highest present, or 1).
        overwrite: replace an existing version.
        log: where progress lines go.
        progress: show a progress bar over the export's stages (on stderr).

    Raises:
        ExportError: a bad `name` given, a bad version, or the version exists and `overwrite` is off.
        keras_seg.inference.InferenceError: not a usable run directory.
    """
    from keras_seg import inference
    from keras_seg.contract import InferenceContract

    run_dir = os.fspath(run_dir)
    name = name or model_name_from_folder(run_dir)
    if not re.fullmatch(MODEL_NAME_PATTERN, name):
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


# --------------------------------------------------------------------------- deployment artifacts

FORMATS = ("saved_model", "litert", "onnx", "openvino")
QUANTIZATIONS = ("none", "fp16", "int8")
ARTIFACT_FILES = {"litert": "model.tflite", "onnx": "model.onnx", "openvino": "model.xml"}
# Every name an artifact export writes: a folder holding any of them holds an export.
EXPORT_FILE_NAMES = (*ARTIFACT_FILES.values(), "model.bin", "labels.json")
DEFAULT_CALIBRATION_IMAGES = 200


def deployment_model(model, input_size):
    """The run's model behind a fixed input: float32 RGB pixels [1, h, w, 3] in [0, 255] -> logits.

    The division by 255 is inside, so clients feed pixels, and an int8 model's uint8 input maps
    one pixel value to one quantized step. One fixed shape: delegates reject dynamic ones.

    A model whose input goes only to an ImageNet encoder's preprocessing (`ScaleTo255`,
    `CaffePreprocessing`, which multiply [0, 1] by 255 again) gets the pixels there directly: TFLite's
    int8 quantizer gives the [0, 1] tensor between the two multiplications the scale of the 0-255
    product, one step per unit, which turns the image into black and white (a trained LR-ASPP-Small
    fell from 33.4 to 11.0 mIoU so; docs/deploy.md).
    """
    import keras

    # The wrapper computes in float32 whatever policy the process has (a run trained in mixed precision
    # in this session left it set: a bfloat16 Mul then stopped the LiteRT conversion).
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_dtype_policy("float32")
    try:
        return _deployment_model(model, input_size)
    finally:
        keras.mixed_precision.set_dtype_policy(policy)


def _deployment_model(model, input_size):
    import keras

    from keras_seg.models.preprocessing import CaffePreprocessing, ScaleTo255

    pixels = keras.Input(shape=(*input_size, 3), batch_size=1, dtype="float32", name="images")
    preprocessing = _only_consumer_of_the_input(model)
    if isinstance(preprocessing, (ScaleTo255, CaffePreprocessing)):
        after_preprocessing = keras.Model(preprocessing.output, model.output, name=f"{model.name}_from_pixels")
        if isinstance(preprocessing, CaffePreprocessing):
            pixels_in = caffe_from_pixels(pixels)
        else:
            pixels_in = pixels  # ScaleTo255's output is the pixels themselves
        logits = after_preprocessing(pixels_in)
    else:
        logits = model(keras.layers.Rescaling(1.0 / 255.0, name="to_unit_range")(pixels))
    return keras.Model(pixels, keras.layers.Identity(name="logits")(logits), name="keras_seg_deploy")


def caffe_from_pixels(pixels):
    """`CaffePreprocessing` on 0-255 RGB, as a 1x1 convolution: the RGB -> BGR permutation as its kernel,
    minus the ImageNet means as its bias. Not a flip: TFLite's int8 quantizer gives a REVERSE_V2's output
    another scale than its input, while the op copies the bytes (tests/test_int8_preprocessing.py)."""
    import keras
    import numpy as np

    from keras_seg.models.preprocessing import IMAGENET_BGR_MEAN

    layer = keras.layers.Conv2D(3, 1, name="caffe_from_pixels", dtype="float32")
    outputs = layer(pixels)
    layer.set_weights([np.eye(3, dtype=np.float32)[::-1].reshape(1, 1, 3, 3),
                       -np.asarray(IMAGENET_BGR_MEAN, np.float32)])
    return outputs


def _only_consumer_of_the_input(model):
    """The one layer the model's input feeds, or None (several, or a nested model's input)."""
    source = model.inputs[0]
    consumers = {id(layer): layer for layer in model.layers for node in layer._inbound_nodes
                 if any(tensor is source for tensor in node.input_tensors)}
    return next(iter(consumers.values())) if len(consumers) == 1 else None


CALIBRATION_SHUFFLE_RECORDS = 64  # small: the shards' order is shuffled, and several are read in turn
CALIBRATION_CYCLE = 16  # shards read at once, a record from each in turn


def calibration_shards(run_dir, data_dir=None):
    """(TFRecord directory, its training shards' paths) to calibrate on: `data_dir`, else the run's --data."""
    import json

    from keras_seg import tfrecord

    if data_dir is None:
        with open(os.path.join(run_dir, "config.json")) as f:
            data_dir = json.load(f).get("data")
    if not data_dir or not os.path.isdir(data_dir):
        raise ExportError(f"int8 calibration needs the run's training data: {data_dir!r} is not a directory "
                          "(give --calibration-data DIR)")
    try:
        info = tfrecord.load_dataset_info(data_dir)
        shards = [os.path.join(data_dir, s) for s in info["splits"]["train"]["shards"]]
    except (tfrecord.DatasetFormatError, KeyError, OSError) as err:
        raise ExportError(f"--calibration-data {data_dir}: no training TFRecords ({err})") from err
    if not shards:
        raise ExportError(f"--calibration-data {data_dir}: no training TFRecords (split 'train' lists no shards)")
    return data_dir, shards


def calibration_records(shards, seed=0):
    """The serialized training records in random order, without reading the split first: the shards' order
    shuffled, `CALIBRATION_CYCLE` of them read a record at a time in turn, then a shuffle of
    `CALIBRATION_SHUFFLE_RECORDS` records. A 4,096-record shuffle over the split filled its buffer before
    the first window: +200 MB for one 181 MB shard, about 7 GB for full-resolution Cityscapes (estimated)."""
    import tensorflow as tf

    files = tf.data.Dataset.from_tensor_slices(list(shards)).shuffle(len(shards), seed=seed)
    records = files.interleave(lambda path: tf.data.TFRecordDataset(path),
                               cycle_length=min(len(shards), CALIBRATION_CYCLE), block_length=1)
    return records.shuffle(CALIBRATION_SHUFFLE_RECORDS, seed=seed)


def calibration_windows(data_dir, shards, contract, count, seed=0):
    """Up to `count` float32 windows [h, w, 3] in [0, 255] of the training images, as the artifact gets them.

    Each image goes through the artifact's own contract code (`contract_probabilities`: rescaled, padded,
    centred for "fit", cut into windows) around a model call that only records its input, rounded back to
    pixels as `keras_seg.runtimes` feeds the file: calibration cannot drift from inference (it padded "fit"
    images at the corner while the artifact centres them). A damaged shard: a one-line ExportError naming it.
    """
    import numpy as np
    import tensorflow as tf

    from keras_seg import contract as contracts
    from keras_seg import data

    windows = []

    def record(batch):  # float32 [n, h, w, 3] in [0, 1], the windows of one image
        windows.extend(np.round(batch.numpy() * 255.0).astype(np.float32))
        return tf.zeros([*batch.shape[:3], 1])  # one dummy class: the averaging stays small

    try:
        for image, _ in calibration_records(shards, seed).map(data.decode_record):
            contracts.contract_probabilities(image[None], record, contract, 1)
            if len(windows) >= count:
                break
    except tf.errors.OpError as err:  # as the trainer and evaluate: the shards are scanned only now, on error
        found = data.damaged_shard(data_dir, ["train"]) if isinstance(err, tf.errors.DataLossError) else None
        if found is None:
            found = f"reading {data_dir}: {(err.message.strip() or type(err).__name__).splitlines()[0]}"
        raise ExportError(f"int8 calibration: {found}") from None
    return windows[:count]


def litert_options(quantize, windows=None):
    """`Model.export(format="litert")` converter options for a quantization. For int8 the converter only
    calibrates (records each tensor's float range over `windows`): `quantize_calibrated` then pins the
    input's range and quantizes."""
    import tensorflow as tf

    # Builtin ops only: Keras' default adds SELECT_TF_OPS (Flex), which most devices cannot run.
    if quantize == "none":
        return {"target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]}}
    if quantize == "fp16":
        return {"optimizations": [tf.lite.Optimize.DEFAULT],
                "target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS],
                                "supported_types": [tf.float16]}}

    def representative_dataset():
        for window in windows:
            yield [window[None]]

    return {"optimizations": [tf.lite.Optimize.DEFAULT], "representative_dataset": representative_dataset,
            "target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]},
            "_experimental_calibrate_only": True}


PIXEL_RANGE = (0.0, 255.0)  # an int8 model's input range whatever the calibration saw: scale 1, zero point 0


def quantize_calibrated(calibrated: bytes) -> bytes:
    """A calibrated float .tflite (`litert_options("int8")`) -> full-integer int8 with uint8 pixels in and
    int8 logits out, its input range pinned to 0..255 so that a pixel is fed as it is (scale 1, zero
    point 0). The quantizer takes each tensor's range from calibration, so the input's scale was 1 only
    when the windows held both 0 and 255: calibrated on dark images it was 0.467, and a client feeding
    raw pixels fed them 2.1x too bright. The quantization step is the converter's own (`mlir_quantize`
    with the arguments `TFLiteConverter` passes it); raises ExportError if the input is not as pinned."""
    import numpy as np
    import tensorflow as tf
    from tensorflow.lite.python import convert
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(calibrated))
    graph = model.subgraphs[0]
    for index in graph.inputs:
        tensor = graph.tensors[index]
        if tensor.quantization is None:
            tensor.quantization = schema.QuantizationParametersT()
        tensor.quantization.min = np.array([PIXEL_RANGE[0]], np.float32)
        tensor.quantization.max = np.array([PIXEL_RANGE[1]], np.float32)
    pinned = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    quantized = convert.mlir_quantize(pinned, input_data_type=tf.uint8, output_data_type=tf.int8)
    quantized = convert.deduplicate_readonly_buffers(quantized)
    check_pixel_input(quantized)
    return quantized


def check_pixel_input(tflite: bytes):
    """Raise ExportError unless the model's input is uint8 pixels at scale 1, zero point 0."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite))
    graph = model.subgraphs[0]
    tensor = graph.tensors[graph.inputs[0]]
    quantization = tensor.quantization
    scale = list(quantization.scale) if quantization is not None and quantization.scale is not None else []
    zero = list(quantization.zeroPoint) if quantization is not None and quantization.zeroPoint is not None else []
    if tensor.type != schema.TensorType.UINT8 or scale != [1.0] or zero != [0]:
        raise ExportError(f"int8 conversion did not keep the input as uint8 pixels at scale 1, zero point 0 (got type "
                          f"{tensor.type}, scale {scale}, zero point {zero}): the converter ignored the pinned range")


def litert_op_report(path) -> dict:
    """{op name: count} of a .tflite's ops, and those that compute in float (a float input or output)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=os.fspath(path))
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    ops, float_ops = {}, {}
    for op in interpreter._get_ops_details():  # noqa: SLF001 - the interpreter's only op listing
        name = op["op_name"]
        ops[name] = ops.get(name, 0) + 1
        used = [tensors[i]["dtype"].__name__ for i in list(op["inputs"]) + list(op["outputs"]) if i in tensors]
        if any(d in ("float32", "float16") for d in used):
            float_ops[name] = float_ops.get(name, 0) + 1
    return {"ops": ops, "float_ops": float_ops}


def describe_io(path, kind) -> dict:
    """The artifact's input and output as its own runtime reads them: name, dtype, shape, value range."""
    from keras_seg import runtimes

    runtime = runtimes.load_runtime(path)
    if kind == "litert":
        pairs = [(runtime.input, "input"), (runtime.output, "output")]
        described = {}
        for detail, role in pairs:
            entry = {"name": detail["name"], "dtype": detail["dtype"].__name__,
                     "shape": [int(v) for v in detail["shape"]]}
            scale, zero = detail["quantization"]
            if scale:
                entry["quantization"] = {"scale": float(scale), "zero_point": int(zero),
                                         "real_value": "(q - zero_point) * scale"}
            described[role] = entry
    elif kind == "onnx":
        described = {"input": {"name": runtime.input.name, "dtype": "float32", "shape": list(runtime.input.shape)},
                     "output": {"name": runtime.output_name, "dtype": "float32",
                                "shape": list(runtime.session.get_outputs()[0].shape)}}
    else:
        model = runtime.compiled
        described = {"input": {"name": model.input(0).get_any_name(), "dtype": "float32",
                               "shape": list(model.input(0).get_partial_shape().to_shape())},
                     "output": {"name": model.output(0).get_any_name(), "dtype": "float32",
                                "shape": list(model.output(0).get_partial_shape().to_shape())}}
    described["input"]["value_range"] = "RGB pixels 0..255 (not normalised: the model divides by 255 itself)"
    described["input"]["layout"] = "NHWC, batch 1, the contract's input size"
    described["output"]["value_range"] = "logits (softmax over the last axis gives probabilities)"
    described["output"]["layout"] = "NHWC: [1, h, w, num_classes]"
    return described


def export_artifact(run_dir, output_dir, fmt, quantize="none", calibration_images=DEFAULT_CALIBRATION_IMAGES,
                    calibration_data=None, overwrite=False, log=print) -> str:
    """Export a run's model as a LiteRT, ONNX or OpenVINO file in `output_dir` beside `labels.json`;
    returns the model file's path. `labels.json` holds the run's labels and contract and, under
    "artifact", the format, quantization, exact input / output description and the SHA-256 of each
    model file ("files").

    One export per folder: a folder that holds one is refused unless `overwrite`. The model and its
    labels are bound by those checksums, which `keras_seg.runtimes` checks on every load, rather than
    published as one unit: the check is made where the pair is used, so it refuses a mixed pair however
    it came about (an export killed between its renames, OpenVINO's .xml and .bin from two exports, a
    file copied in by hand), and it needs no swap of the whole folder, which could take a user's other
    files with it. The model files are moved in first and `labels.json` written last, so until it is,
    the new files are refused beside the old labels."""
    from keras_seg import inference, runtimes
    from keras_seg.contract import InferenceContract
    from keras_seg.files import write_json_atomically as write_json

    if fmt not in ARTIFACT_FILES:
        raise ExportError(f"--format {fmt!r}: one of {FORMATS}")
    if quantize != "none" and fmt != "litert":
        raise ExportError(f"--quantize {quantize}: LiteRT only (ONNX and OpenVINO are exported in float32)")
    if quantize == "int8" and int(calibration_images) < 1:
        raise ExportError(f"--calibration-images must be >= 1, got {calibration_images}")
    for module in (None, *runtimes.CONVERTERS[fmt]):  # a missing extra: one line, before anything heavy
        runtimes.require(fmt, module)
    output_dir = os.fspath(output_dir)
    path = os.path.join(output_dir, ARTIFACT_FILES[fmt])
    previous = [name for name in EXPORT_FILE_NAMES if os.path.lexists(os.path.join(output_dir, name))]
    if previous and not overwrite:
        raise ExportError(f"{output_dir} already holds an export ({', '.join(previous)}): choose another --output, "
                          "or --overwrite to replace it")
    model, info = inference.load_run_model(run_dir)
    contract = InferenceContract.from_dict(info["inference"])
    if contract.size_divisor:
        # The run pads each whole image only to a multiple of the model's stride; an artifact has one fixed
        # input, so its contract pads up to that input (a stretched image fills it exactly).
        log(f"{run_dir}: the artifact takes {contract.input_size[0]}x{contract.input_size[1]} inputs only: whole "
            f"images smaller than that (lower TTA scales, keep_ratio) are padded up to it, not to a multiple of "
            f"{contract.size_divisor}")
        contract = dataclasses.replace(contract, size_divisor=None)
        info = dict(info, inference=contract.to_dict())
    import keras
    import numpy as np

    deploy = deployment_model(model, contract.input_size)
    deploy(np.zeros((1, *contract.input_size, 3), np.float32))  # the ONNX exporter wants a model that was called
    os.makedirs(output_dir, exist_ok=True)
    artifact = {"format": fmt, "quantize": quantize, "file": ARTIFACT_FILES[fmt]}
    options = {}
    if fmt == "litert":
        windows = None
        if quantize == "int8":
            data_dir, shards = calibration_shards(run_dir, calibration_data)
            windows = calibration_windows(data_dir, shards, contract, int(calibration_images))
            artifact["calibration"] = {"windows": len(windows), "source": "the run's training TFRecords, rescaled "
                                       "and windowed by the inference contract"}
        options = litert_options(quantize, windows)
    log(f"exporting {run_dir} as {fmt}" + (f" ({quantize})" if quantize != "none" else "") + f" to {path}")
    staging = tempfile.mkdtemp(prefix=".export-", dir=output_dir)
    try:
        staged = os.path.join(staging, ARTIFACT_FILES[fmt])
        try:
            deploy.export(staged, format=fmt, verbose=False, input_signature=[keras.InputSpec(
                shape=(1, *contract.input_size, 3), dtype="float32")], **options)
            if quantize == "int8":  # the file written is the calibrated float model
                with open(staged, "rb") as f:
                    quantized = quantize_calibrated(f.read())
                with open(staged, "wb") as f:
                    f.write(quantized)
        except ExportError:
            raise
        except Exception as err:  # converters raise their own types; say which op failed, in one line
            raise ExportError(f"{fmt} conversion failed: {_conversion_error(err)}") from err
        if fmt == "litert":
            artifact["ops"] = litert_op_report(staged)
        artifact.update(describe_io(staged, fmt))
        written = sorted(os.listdir(staging))  # OpenVINO writes model.xml and model.bin
        artifact["files"] = {name: {"sha256": file_sha256(os.path.join(staging, name)),
                                    "bytes": os.path.getsize(os.path.join(staging, name))} for name in written}
        for name in written:  # killed in between: the old labels.json's checksums refuse the mix
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_json(os.path.join(output_dir, inference.LABELS_NAME), dict(info, artifact=artifact))
    for name in previous:  # --overwrite: the replaced export's files of another format
        if name not in written and name != inference.LABELS_NAME:
            os.remove(os.path.join(output_dir, name))
    return path


def _conversion_error(err) -> str:
    """The converter's message line naming the op or layer, else its first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    for line in lines:
        if re.search(r"\bop\b|operator|layer|not supported|unsupported", line, re.IGNORECASE):
            return line[:300]
    return lines[0][:300]


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_seg.export",
        description="Export a training run's best model as a SavedModel that TF Serving serves "
                    "(DIR/NAME/VERSION), with its labels in assets/labels.json.",
    )
    parser.add_argument("--run", required=True, help="run directory written by keras_seg.train (uses best.keras)")
    parser.add_argument("--output", required=True, metavar="DIR", help="model base directory")
    parser.add_argument("--name", help="model name, the folder under DIR and the name in serving URLs: letters, "
                                       "digits, '_', '.', '-' (default: the run directory's name, other "
                                       "characters made '_')")
    parser.add_argument("--version", type=int, help="version number (default: one above the highest in DIR/NAME)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DIR/NAME/VERSION, or the "
                                                                 "export DIR holds (--format litert|onnx|openvino)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--format", choices=FORMATS, default="saved_model",
                        help="saved_model (TF Serving, the default), litert (.tflite), onnx (.onnx) or openvino "
                             "(.xml + .bin); the last three go in DIR with labels.json, at the contract's input size")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default="none",
                        help="litert only: fp16 (float16 weights) or int8 (full-integer, uint8 pixels in)")
    parser.add_argument("--calibration-images", type=int, metavar="N",
                        help=f"int8: calibration windows from the run's training TFRecords "
                             f"(default {DEFAULT_CALIBRATION_IMAGES})")
    parser.add_argument("--calibration-data", metavar="DIR",
                        help="int8: the TFRecord directory to calibrate on (default: the run's --data)")
    return parser


def score_command(run_dir, path, fmt, quantize) -> str:
    """The `evaluate` command that scores an artifact, as a shell line that runs as written: on the run's own
    data when its config.json names a directory that exists (else a DATA placeholder), into
    RUN/evaluation/FORMAT[-QUANTIZE] (evaluate needs --output for an exported model)."""
    import json
    import shlex

    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            data_dir = json.load(f).get("data")
    except (OSError, ValueError):
        data_dir = None
    if not data_dir or not os.path.isdir(data_dir):
        data_dir = "DATA"
    output = os.path.join(run_dir, "evaluation", fmt if quantize == "none" else f"{fmt}-{quantize}")
    return shlex.join(["python", "-m", "keras_seg.evaluate", "--model", path, "--data", data_dir, "--output", output])


def flags_that_do_not_apply(args) -> list:
    """The flags given that this export would ignore, each with what it applies to."""
    ignored = []
    if args.format != "saved_model":
        ignored += [f"{flag} applies to --format saved_model (a {args.format} export is DIR itself)"
                    for flag, value in (("--name", args.name), ("--version", args.version)) if value is not None]
    elif args.quantize != "none":
        ignored.append("--quantize applies to --format litert")
    if args.quantize != "int8":
        ignored += [f"{flag} applies to --quantize int8" for flag, value in
                    (("--calibration-images", args.calibration_images), ("--calibration-data", args.calibration_data))
                    if value is not None]
    return ignored


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    ignored = flags_that_do_not_apply(args)
    if ignored:  # refused rather than silently ignored
        parser.exit(2, f"error: {ignored[0]}\n")
    from keras_seg.quiet import import_tensorflow

    import_tensorflow()
    from keras_seg.inference import InferenceError

    if args.format != "saved_model":
        calibration_images = DEFAULT_CALIBRATION_IMAGES if args.calibration_images is None else args.calibration_images
        try:
            path = export_artifact(args.run, args.output, args.format, args.quantize, calibration_images,
                                   args.calibration_data, args.overwrite)
        except (ExportError, InferenceError, OSError) as err:
            parser.exit(2, f"error: {err}\n")
        print(f"wrote {path} and {os.path.join(os.path.dirname(path), 'labels.json')} (classes, contract, input "
              f"and output)\nscore it: {score_command(args.run, path, args.format, args.quantize)}")
        return 0
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
