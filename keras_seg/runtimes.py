"""Deployment artifacts run through their own runtimes: LiteRT, ONNX Runtime, OpenVINO.

`keras_seg.export --format litert|onnx|openvino` writes a model of one fixed input, RGB pixels
[1, h, w, 3] at the inference contract's input size (float32 in [0, 255], or uint8 for an int8
LiteRT model), giving logits [1, h, w, C], beside a `labels.json`. Each class here loads one such
file with its runtime and gives logits for a batch of windows at that size; `artifact_segmenter`
wraps it in the same contract code (`keras_seg.contract`) as a run or a SavedModel, so
`evaluate --model` and `predict --model` score an artifact with the same windows as its run, but
for one case: a run whose contract has a `size_divisor` (every whole-image run trained since it was
recorded) pads a whole image only to a multiple of the model's stride, while the artifact, of one
fixed input, pads it up to that input (export's contract drops the divisor); images that fill the
input (stretched ones) see the same pixels, smaller ones (lower `--tta` scales, keep_ratio) more
padding, so their scores may differ.

The runtimes are optional extras: a missing one is a one-line `InferenceError` naming the
`pip install` that fixes it.
"""

from __future__ import annotations

import json
import os

import numpy as np

from keras_seg.files import file_sha256
from keras_seg.segmenter import EXPORT_FORMAT, LABELS_NAME, InferenceError, Segmenter, exported_contracts

SUFFIXES = {".tflite": "litert", ".onnx": "onnx", ".xml": "openvino"}
EXTRAS = {"litert": ("ai_edge_litert", "keras-seg[litert]"), "onnx": ("onnxruntime", "keras-seg[onnx]"),
          "openvino": ("openvino", "keras-seg[openvino]")}


# What exporting needs beyond the runtime: Keras' ONNX export runs tf2onnx; OpenVINO's TF front end imports scipy.
CONVERTERS = {"litert": (), "onnx": ("tf2onnx",), "openvino": ("scipy",)}


def require(kind: str, module: str | None = None):
    """The runtime module of `kind` (or `module`, part of its extra), or a one-line InferenceError
    saying which pip install adds it."""
    import importlib

    runtime, extra = EXTRAS[kind]
    module = module or runtime
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise InferenceError(f"{module}, needed for {kind}, is not installed ({err}): pip install '{extra}'") from err


def artifact_kind(path) -> str | None:
    """"litert", "onnx" or "openvino" from a file name; None for anything else."""
    return SUFFIXES.get(os.path.splitext(os.fspath(path))[1].lower())


def _run_windows(run_one, pixels):
    """An artifact of batch 1 over a batch: float32 logits [n, h, w, C]."""
    return np.concatenate([run_one(pixels[i:i + 1]) for i in range(pixels.shape[0])], axis=0)


class LiteRTRuntime:
    """A `.tflite` model in the LiteRT interpreter (`ai-edge-litert`); int8 inputs/outputs are
    (de)quantized with the tensors' own scale and zero point."""

    kind = "litert"

    def __init__(self, path, threads=None):
        litert = require("litert")
        from ai_edge_litert.interpreter import Interpreter

        del litert
        self.interpreter = Interpreter(model_path=os.fspath(path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    @property
    def input_shape(self):
        return tuple(int(v) for v in self.input["shape"])

    def _one(self, pixels):
        dtype = self.input["dtype"]
        if dtype == np.float32:
            feed = pixels.astype(np.float32)
        else:
            scale, zero = self.input["quantization"]
            info = np.iinfo(dtype)
            feed = np.clip(np.round(pixels / scale + zero), info.min, info.max).astype(dtype)
        self.interpreter.set_tensor(self.input["index"], feed)
        self.interpreter.invoke()
        out = self.interpreter.get_tensor(self.output["index"])
        if out.dtype != np.float32:
            scale, zero = self.output["quantization"]
            out = (out.astype(np.float32) - zero) * scale
        return out

    def logits(self, pixels):
        """float32 RGB pixels [n, h, w, 3] in [0, 255] -> float32 logits [n, h, w, C]."""
        return _run_windows(self._one, pixels)


class OnnxRuntime:
    """An `.onnx` model in ONNX Runtime's CPU execution provider."""

    kind = "onnx"

    def __init__(self, path, threads=None):
        ort = require("onnx")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        self.output_name = self.session.get_outputs()[0].name

    @property
    def input_shape(self):
        return tuple(self.input.shape)

    def _one(self, pixels):
        return self.session.run([self.output_name], {self.input.name: pixels.astype(np.float32)})[0]

    def logits(self, pixels):
        return _run_windows(self._one, pixels)


class OpenVINORuntime:
    """An OpenVINO IR (`.xml` + `.bin`) compiled for the CPU; `precision` "f32" (parity with Keras) or
    "bf16" (what OpenVINO picks by itself on CPUs that have it)."""

    kind = "openvino"

    def __init__(self, path, threads=None, precision="f32"):
        ov = require("openvino")
        config = {"INFERENCE_PRECISION_HINT": precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = ov.Core().compile_model(os.fspath(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.precision = precision

    @property
    def input_shape(self):
        return tuple(self.compiled.input(0).get_partial_shape().to_shape())

    def _one(self, pixels):
        return np.array(self.request.infer({0: pixels.astype(np.float32)})[self.compiled.output(0)], np.float32)

    def logits(self, pixels):
        return _run_windows(self._one, pixels)


def load_runtime(path, threads=None, openvino_precision="f32"):
    """The runtime object for an artifact file, chosen by its suffix."""
    kind = artifact_kind(path)
    try:
        if kind == "litert":
            return LiteRTRuntime(path, threads)
        if kind == "onnx":
            return OnnxRuntime(path, threads)
        if kind == "openvino":
            return OpenVINORuntime(path, threads, openvino_precision)
    except InferenceError:
        raise
    except Exception as err:  # each runtime raises its own types for an unreadable file
        text = (str(err) or type(err).__name__).strip().splitlines()[0]
        raise InferenceError(f"{path}: the {kind} runtime cannot load it ({text})") from err
    raise InferenceError(f"{path}: not a deployment artifact (.tflite, .onnx or OpenVINO .xml)")


def read_artifact_info(path) -> dict:
    """The `labels.json` beside an artifact (written by `keras_seg.export`), once the model file(s) beside
    it are checked to be the very ones it was written with (`check_bound`)."""
    labels = os.path.join(os.path.dirname(os.path.abspath(path)), LABELS_NAME)
    try:
        with open(labels) as f:
            info = json.load(f)
    except FileNotFoundError:
        raise InferenceError(f"{path}: no {LABELS_NAME} beside it: not exported by keras_seg.export") from None
    except (OSError, json.JSONDecodeError) as err:
        raise InferenceError(f"{labels}: unreadable labels file ({err})") from err
    if info.get("format") != EXPORT_FORMAT or "inference" not in info:
        raise InferenceError(f"{labels}: not a keras_seg.export labels file")
    check_bound(path, labels, info)
    return info


def check_bound(path, labels, info):
    """Refuse a model whose files are not those `labels.json` records by checksum (under "artifact" ->
    "files"): a second export into the folder, one interrupted between its files, or a file copied
    in by hand would otherwise be read with another model's classes, contract and input type."""
    files = (info.get("artifact") or {}).get("files")
    name = os.path.basename(os.fspath(path))
    if not files:
        raise InferenceError(f"{path} and {labels}: {LABELS_NAME} records no checksum of the model (written by an "
                             f"earlier keras-seg), so the pair cannot be trusted: export the run again")
    if name not in files:
        raise InferenceError(f"{path} and {labels}: not one export ({LABELS_NAME} describes {', '.join(files)}): "
                             "export the run again into its own folder")
    directory = os.path.dirname(os.path.abspath(path))
    for file_name, recorded in files.items():
        file_path = os.path.join(directory, file_name)
        if not os.path.isfile(file_path):
            raise InferenceError(f"{path} and {labels}: {file_name}, part of this export, is missing")
        if file_sha256(file_path) != recorded.get("sha256"):
            raise InferenceError(f"{path} and {labels}: not one export ({file_name} is not the file {LABELS_NAME} "
                                 "was written with: another export or an interrupted one replaced one of them): "
                                 "export the run again")


def artifact_segmenter(path, mode=None, tile=None, overlap=None, threads=None, openvino_precision="f32"):
    """A `keras_seg.segmenter.Segmenter` running an artifact's windows through its runtime.

    The artifact takes one input size; the contract may change its mode or overlap, not its window.
    """
    import tensorflow as tf

    path = os.fspath(path)
    info = read_artifact_info(path)
    recorded, wanted = exported_contracts(info, path, mode, tile, overlap)
    runtime = load_runtime(path, threads, openvino_precision)
    height, width = recorded.input_size
    num_classes = int(info["num_classes"])

    def logits(images):  # float32 [n, h, w, 3] in [0, 1], the contract's windows: back to their pixel values
        return runtime.logits(np.round(images * 255.0)).astype(np.float32)

    def model_function(images):
        out = tf.numpy_function(logits, [images], tf.float32, stateful=False)
        out = tf.ensure_shape(out, [None, height, width, num_classes])
        return tf.nn.softmax(out, axis=-1)

    return Segmenter(dict(info, inference=wanted.to_dict()), path, runtime.kind, None, model_function, owner=runtime)
