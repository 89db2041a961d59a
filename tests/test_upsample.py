"""UpSample2D's bilinear up-sampling: the function of `tf.image.resize` (half-pixel centres, edges clamped,
no antialiasing) and its gradient, checked against an interpolation matrix built here in float64; the
gradient runs without TensorFlow's ResizeBilinearGrad (one thread on CPU); models saved before load."""

import base64
import zlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seg.models.layers import UpSample2D

# A .keras file saved by the layer before its gradient changed (commit 1cecd51): Input (None, None, 2)
# -> UpSample2D(2, name="up2") -> UpSample2D((4, 2), dtype="float32", name="up4x2"), zlib + base64.
OLD_KERAS_FILE = (
    "eNrtW81v2zYUp+w4MfqBZUCALUE3uAKCpoWr2mq6FjkMGZZ0HlKsxtoCRYtAoW3F1iJLgj7SpIaHAsOw7LbjTkOOPRY79TKgx962"
    "PyHH3bb/oCMl0hIpK8mcpgsW/hCFeeQjH/n4Mx9NRvWV/NgUiHARBJ3ub4voL/ycR09X92EL+lD5xrOtnryhu9DTNnXXM2xLXijJ"
    "15XqDaUql0sy0tI1D27qLZyvVtRPrlbVq5Wbi2ploTK/ULkp9+uMqVeNR9//Mg4Afs6inKZtrRttYqhrtwJTxy2FJhXPbSooTzc9"
    "ZT2wmj4yD01stmlCz9Ms2A2Vb7NlYYsovydTBdtsaYHjwa6DWkcqvgsNCzZCU74b6CjLhNtofEh+nO4GKUvZ/dJyAv8OLuTsNqDf"
    "7GheBzpY77EVmGa5lPytrmLf+dthubxu2tC/ruJGPAe6Hs5ch6aH++XCdjt0Ls2gxo0ubOthp2yHDJ4o9XE1vW14vu7qLdrbyPCQ"
    "6obVsAML6SFHhw5YRQ2knKB5epvORZY/Hjj3QherSxnzEDhqhvupL1J201aW7iPVum0aze0MM9Sf2Y7AJZ7xNJwdlUyHYSE1xzah"
    "T1jeMEzD0qGb0U7sl0/ZgTcCA/Et0S8D82R/OvQTU0O8lJqXngzdNvmLdYmmRX3xdcuzXU3j/DIKEaMGO2jMtruN68aMqaCf1X4f"
    "19x4QrrUQ/Ix0mZ+6wQSZ/7kEYf46aRRJ2J0Jm8iJ+KhxqswRze8zAU+p0LHGzU83NdsbDjAw3SGm3bXMUw9odhPhLHvdn9Y/ev3"
    "b3vFKgD4mcQRE1NceaIb7Y7vKZ0bP9aWbp8/M3MmrFAsgrFQK8YbAlw/KdPyNZJKJN0h6fMczZfCsg9J/vukfV7v/tfLy1j7DQdq"
    "Z68QpUUgcBpRW/6sjtOHRKZ8ep1j9TbRtgSn0acv5uXiiHYlkGf4O0n4OzfB8j/iL8jkr4Dgb5K/dB3bKfB8i1B/S3bvfXV3SQK5"
    "waq+8wFr5wWR/5hm+1XKs3o1IncKp3P+aNzi/XCOrCwSKIAp5D0czrE8LUlhjcmBD4uMP8/huZiIffzF53fvSIBU4PQwkt8MsUyX"
    "vXGSRrsQAEj3Bina0YTpGJELg3y0JUmMb+c98RkVEBAQEBAQEBAQEBAQEDhuZJ2T8+czB52TFz+K0jnh0lMJ/pzxFkn/nmb1EtdY"
    "oRw4WnS4pLZ4WauC+Dyq9C/568xE8k8XDsffyYuEx2IqBX/B4DgUvLjA6tF7nsH59BHtRufk+QHvajOU12AojynPX8qs3h6RwSy7"
    "Du9dZvWKV0h5+f8Wx4bflz0kflkDyXVA3JcJHG4doJ/LlyWebxHe7n2ZNLBX/5i1s0Xkn0tijvYDjf+8v0a9L8P3XPS+LLfPfoNf"
    "fw/ab9yaE/sNsc6k9xul2ePdb2TFyWeXRZwUOHqc3Lv0buPk1ixrZ5fIry6JOTpMnOT9NWqczCfiZH6fOMl//zgoTq5dE3FSrDPp"
    "OFkr/zdx8nlFxEmBo8fJ4rV3Gyd3y6yd10T+UxFzdJg4yftr1DhZSMRJ/L+R9RUpN5XPftOQ4lnYAPPeIV+Vf3MwrroBmPcIkxWH"
    "vasRV1Qn0m9u1FcK41GUz4NfUdoJj/r/AYqpl7g="
)

# (input shape, factor): odd sizes, a 1x1 image, unequal factors (TensorFlow's gradient op), a factor that
# is not a power of two.
CASES = [((2, 5, 7, 3), 2), ((1, 1, 1, 4), 2), ((3, 4, 9, 2), (4, 2)), ((1, 3, 5, 1), 8), ((1, 2, 3, 2), 3),
         ((2, 16, 32, 19), 2)]


def interpolation_matrix(size, factor):
    """(size * factor, size) float64 weights of half-pixel bilinear interpolation, edges clamped."""
    matrix = np.zeros((size * factor, size))
    for out in range(size * factor):
        source = (out + 0.5) / factor - 0.5
        below = np.floor(source)
        weight = source - below
        matrix[out, int(np.clip(below, 0, size - 1))] += 1 - weight
        matrix[out, int(np.clip(below + 1, 0, size - 1))] += weight
    return matrix


def factors(factor):
    return factor if isinstance(factor, tuple) else (factor, factor)


def reference_up(x, factor):
    rows, columns = (interpolation_matrix(n, f) for n, f in zip(x.shape[1:3], factors(factor)))
    return np.einsum("oh,bhwc,pw->bopc", rows, x.astype(np.float64), columns)


def reference_gradient(upstream, factor):
    """d sum(up(x) * upstream) / dx: the transposed interpolation matrices applied to `upstream`."""
    (fh, fw), (height, width) = factors(factor), upstream.shape[1:3]
    rows, columns = interpolation_matrix(height // fh, fh), interpolation_matrix(width // fw, fw)
    return np.einsum("oh,bopc,pw->bhwc", rows, upstream.astype(np.float64), columns)


def assert_close(actual, want, rtol=1e-6):
    """Float32 agreement: `rtol` of each value, and of the largest one for values near zero."""
    np.testing.assert_allclose(actual, want, rtol=rtol, atol=rtol * np.abs(want).max())


def random_pair(shape, factor, seed=0):
    rng = np.random.default_rng(seed)
    fh, fw = factors(factor)
    upstream_shape = (shape[0], shape[1] * fh, shape[2] * fw, shape[3])
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(upstream_shape).astype(np.float32)


def value_and_gradient(function, x, upstream):
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = function(x)
        total = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
    return y, tape.gradient(total, x)


def op_types(concrete_function):
    graph = concrete_function.graph.as_graph_def()
    nodes = list(graph.node) + [node for function in graph.library.function for node in function.node_def]
    return {node.op for node in nodes}


@pytest.mark.parametrize("shape, factor", CASES)
def test_values_and_gradient_are_tf_image_resize_and_its_gradient(shape, factor):
    x, upstream = random_pair(shape, factor)
    fh, fw = factors(factor)
    layer_y, layer_gradient = value_and_gradient(UpSample2D(factor), x, upstream)
    resize_y, resize_gradient = value_and_gradient(
        lambda t: tf.image.resize(t, [shape[1] * fh, shape[2] * fw], method="bilinear"), x, upstream)
    assert layer_y.dtype == tf.float32 and layer_gradient.shape == shape
    assert_close(layer_y.numpy(), reference_up(x, factor))
    assert_close(layer_y.numpy(), resize_y.numpy())
    assert_close(layer_gradient.numpy(), reference_gradient(upstream, factor))
    assert_close(layer_gradient.numpy(), resize_gradient.numpy())


def test_an_any_size_model_in_a_tf_function_gives_the_values_and_gradient_at_each_size():
    images = keras.Input((None, None, 3))
    model = keras.Model(images, UpSample2D(2, dtype="float32")(images))

    @tf.function(reduce_retracing=True)
    def run(x, upstream):
        return value_and_gradient(model, x, upstream)

    for seed, shape in enumerate([(2, 5, 7, 3), (1, 8, 3, 3), (3, 1, 2, 3)]):
        x, upstream = random_pair(shape, 2, seed)
        y, gradient = run(x, upstream)
        assert_close(y.numpy(), reference_up(x, 2))
        assert_close(gradient.numpy(), reference_gradient(upstream, 2))


def test_the_gradient_runs_no_resize_bilinear_grad_and_the_forward_pass_is_one_resize():
    """ResizeBilinearGrad is a single-threaded loop on CPU; the forward pass stays the ResizeBilinear op
    that the exports (SavedModel, LiteRT, ONNX) map to their own resize."""
    images = keras.Input((None, None, 19))
    model = keras.Model(images, UpSample2D(2, dtype="float32")(images))
    spec = tf.TensorSpec((None, None, None, 19), tf.float32)
    training = tf.function(lambda x, upstream: value_and_gradient(model, x, upstream)[1])
    training_ops = op_types(training.get_concrete_function(spec, spec))
    inference_ops = op_types(tf.function(lambda x: model(x, training=False)).get_concrete_function(spec))
    assert "ResizeBilinearGrad" not in training_ops
    assert "ResizeBilinear" in inference_ops


def test_use_resize_gradient_takes_tensorflows_gradient_op():
    """The switch tools/bench_upsample.py compares with: the same values through ResizeBilinearGrad."""
    layer = UpSample2D(2)
    layer.use_resize_gradient = True
    spec = tf.TensorSpec((None, None, None, 3), tf.float32)
    gradient = tf.function(lambda x, upstream: value_and_gradient(layer, x, upstream)[1])
    assert "ResizeBilinearGrad" in op_types(gradient.get_concrete_function(spec, spec))
    x, upstream = random_pair((2, 5, 7, 3), 2)
    assert_close(gradient(x, upstream).numpy(), reference_gradient(upstream, 2))


@pytest.mark.parametrize("policy, rtol", [("mixed_float16", 2e-3), ("mixed_bfloat16", 1.6e-2)])
def test_mixed_precision_keeps_the_compute_dtype_and_interpolates_in_float32(policy, rtol):
    layer = UpSample2D(4, dtype=policy)
    compute_dtype = tf.as_dtype(layer.compute_dtype)
    x, upstream = random_pair((2, 5, 6, 4), 4)
    x_low = tf.cast(x, compute_dtype)
    y, gradient = value_and_gradient(layer, x_low, upstream)
    assert y.dtype == compute_dtype and gradient.dtype == compute_dtype
    # tf.image.resize interpolates a float16/bfloat16 image in float32; the layer rounds the result once.
    want = tf.cast(tf.image.resize(x_low, [20, 24], method="bilinear"), compute_dtype)
    np.testing.assert_array_equal(y.numpy(), want.numpy())
    # The upstream gradient arrives rounded to the compute dtype (the layer's cast back).
    rounded_upstream = tf.cast(tf.cast(upstream, compute_dtype), tf.float32).numpy()
    assert_close(tf.cast(gradient, tf.float32).numpy(), reference_gradient(rounded_upstream, 4), rtol=rtol)


def test_xla_compiles_the_gradient():
    """The trainer's --jit compiles the whole step."""
    layer = UpSample2D(2)
    gradient = tf.function(lambda x, upstream: value_and_gradient(layer, x, upstream)[1], jit_compile=True)
    x, upstream = random_pair((2, 5, 7, 3), 2)
    assert_close(gradient(x, upstream).numpy(), reference_gradient(upstream, 2))


def test_a_model_saved_before_the_change_loads_and_computes_the_same_function(tmp_path):
    path = tmp_path / "old_upsample.keras"
    path.write_bytes(zlib.decompress(base64.b64decode("".join(OLD_KERAS_FILE))))
    model = keras.saving.load_model(path)
    assert [(layer.size, layer.interpolation) for layer in model.layers[1:]] == [((2, 2), "bilinear"),
                                                                                ((4, 2), "bilinear")]
    x, upstream = random_pair((1, 3, 5, 2), 8)
    y, gradient = value_and_gradient(model, x, upstream[:, :, :20])
    assert y.shape == (1, 24, 20, 2)
    want = reference_up(reference_up(x, 2), (4, 2))
    assert_close(y.numpy(), want)
    want_gradient = reference_gradient(reference_gradient(upstream[:, :, :20], (4, 2)), 2)
    assert_close(gradient.numpy(), want_gradient)


@pytest.mark.slow  # two conversions, ~17 s on 2 cores
def test_exports_of_a_model_with_bilinear_up_sampling_give_its_logits(tmp_path):
    """The forward pass is still one resize in the artifacts (the gradient's custom op stays out)."""
    from keras_seg import export, runtimes
    from tiny_run import INPUT_SIZE, MODEL, write_run

    run = write_run(tmp_path / "run", model={**MODEL, "stem_stride": 2})
    model = keras.saving.load_model(tmp_path / "run" / "best.keras", compile=False)
    assert any(isinstance(layer, UpSample2D) for layer in model.layers)
    pixels = np.random.default_rng(1).integers(0, 256, (2, *INPUT_SIZE, 3)).astype(np.float32)
    expected = model(pixels / 255.0).numpy()
    for fmt in ("litert", "onnx"):
        path = export.export_artifact(run, tmp_path / fmt, fmt, log=lambda _: None)
        got = runtimes.load_runtime(path).logits(pixels)
        assert np.abs(got - expected).max() / np.abs(expected).max() <= 1e-5
        if fmt == "litert":
            ops = {op["op_name"] for op in tf.lite.Interpreter(model_path=path)._get_ops_details()}
            assert "RESIZE_BILINEAR" in ops and not any(op.upper().startswith(("CUSTOM", "FLEX")) for op in ops)
