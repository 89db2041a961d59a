"""keras_seg's BatchNormalization: TensorFlow's fused kernel in training, Keras' computation exactly.

The reference is Keras' own BatchNormalization with the same weights (and, for the moving statistics,
numpy: the batch mean and the biased variance, `moving * momentum + batch * (1 - momentum)`).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seg import export
from keras_seg.models import unet
from keras_seg.models.layers import BatchNormalization
from keras_seg.models.unet import build_unet

SHAPE = (4, 6, 5, 8)  # 120 values per channel: Bessel's correction would change the variance by 0.8%
MOMENTUM = 0.6  # far from 0.5 and from Keras' 0.99, so that momentum and 1 - momentum cannot be swapped unseen
FUSED = "FusedBatchNormV3"


@pytest.fixture
def policy():
    """Set a dtype policy for the test; the float32 one is back afterwards."""
    yield keras.mixed_precision.set_dtype_policy
    keras.mixed_precision.set_dtype_policy("float32")


def norm_pair(seed=0, **kwargs):
    """Keras' BatchNormalization and ours, built for SHAPE, with the same random weights and statistics."""
    rng = np.random.default_rng(seed)
    reference, ours = keras.layers.BatchNormalization(**kwargs), BatchNormalization(**kwargs)
    for layer in (reference, ours):
        layer.build(SHAPE)
    channels = SHAPE[-1]
    values = {"gamma": rng.uniform(0.5, 1.5, channels), "beta": rng.normal(0, 1, channels),
              "moving_mean": rng.normal(0, 1, channels), "moving_variance": rng.uniform(0.5, 2, channels)}
    # renorm's own statistics keep their initial values, the same in both.
    weights = [values.get(w.name, w.numpy()).astype(np.float32) for w in reference.weights]
    reference.set_weights(weights)
    ours.set_weights(weights)
    return reference, ours


def batches(count, dtype="float32", seed=1):
    rng = np.random.default_rng(seed)
    # Channels with their own means and spreads, far from the moving statistics' start.
    return [tf.cast(rng.normal(3, 2, SHAPE) * rng.uniform(0.2, 3, SHAPE[-1]) + rng.normal(0, 4, SHAPE[-1]), dtype)
            for _ in range(count)]


def training_calls(layer, inputs, jit_compile=False):
    """[(output, d/dinput, d/dgamma, d/dbeta)] of each training call, in a tf.function (as in the trainer's
    step), for a fixed random weighting of the output."""
    upstream = tf.constant(np.random.default_rng(2).normal(size=SHAPE), tf.float32)

    @tf.function(jit_compile=jit_compile)
    def call(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
        return (y, *tape.gradient(loss, [x, *layer.trainable_weights]))

    return [[np.asarray(tf.cast(t, tf.float32)) for t in call(x)] for x in inputs]


def op_types(layer, x, training):
    graph = tf.function(lambda x: layer(x, training=training)).get_concrete_function(x).graph
    return {op.type for op in graph.get_operations()}


def numpy_moving_statistics(inputs, mean, variance, momentum):
    for x in inputs:
        x = np.asarray(tf.cast(x, tf.float32), np.float64)
        mean = mean * momentum + x.mean(axis=(0, 1, 2)) * (1 - momentum)
        variance = variance * momentum + x.var(axis=(0, 1, 2)) * (1 - momentum)  # biased, as Keras
    return mean, variance


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("center, scale", [(True, True), (False, True), (True, False)])
def test_training_matches_keras(center, scale, jit_compile):
    reference, ours = norm_pair(momentum=MOMENTUM, center=center, scale=scale)
    assert FUSED in op_types(ours, tf.zeros(SHAPE), training=True)
    assert FUSED not in op_types(reference, tf.zeros(SHAPE), training=True)
    start = [w.numpy().astype(np.float64) for w in (reference.moving_mean, reference.moving_variance)]
    inputs = batches(3)
    expected, got = training_calls(reference, inputs, jit_compile), training_calls(ours, inputs, jit_compile)
    for expected_call, got_call in zip(expected, got, strict=True):
        for name, e, g in zip(["output", "d/dinput", "d/dgamma or beta", "d/dbeta"], expected_call, got_call):
            np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-5 * np.abs(e).max(), err_msg=name)
    mean, variance = numpy_moving_statistics(inputs, *start, MOMENTUM)
    for layer in (reference, ours):
        np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(layer.moving_variance.numpy(), variance, rtol=1e-5)
    assert [w.name for w in ours.weights] == [w.name for w in reference.weights]


@pytest.mark.parametrize("precision, dtype", [("mixed_bfloat16", "bfloat16"), ("mixed_float16", "float16")])
def test_mixed_precision_matches_keras(policy, precision, dtype):
    policy(precision)
    reference, ours = norm_pair(momentum=MOMENTUM)
    inputs = batches(2, dtype)
    assert FUSED in op_types(ours, inputs[0], training=True)
    expected, got = training_calls(reference, inputs), training_calls(ours, inputs)
    # The output and the input's gradient are rounded to the low precision: one step of it apart at most.
    step = 2.0**-7 if dtype == "bfloat16" else 2.0**-10
    for expected_call, got_call in zip(expected, got, strict=True):
        for name, e, g in zip(["output", "d/dinput"], expected_call, got_call):
            np.testing.assert_allclose(g, e, rtol=step, atol=step * np.abs(e).max(), err_msg=name)
        for name, e, g in zip(["d/dgamma", "d/dbeta"], expected_call[2:], got_call[2:]):
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * np.abs(e).max(), err_msg=name)
    for layer in (reference, ours):  # one more training call each
        assert layer(inputs[0], training=True).dtype == dtype
    # The statistics come from the same low-precision values, computed in float32 by both.
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(getattr(ours, name).numpy(), getattr(reference, name).numpy(), rtol=1e-5,
                                   atol=1e-5, err_msg=name)
        assert getattr(ours, name).dtype == "float32"


def test_inference_is_keras_call_bit_for_bit():
    reference, ours = norm_pair()
    x = batches(1)[0]
    assert op_types(ours, x, training=False) == op_types(reference, x, training=False)
    assert FUSED not in op_types(ours, x, training=False)
    for training in (False, None):
        outputs = [tf.function(lambda x, layer=layer, training=training: layer(x, training=training))(x).numpy()
                   for layer in (ours, reference)]
        np.testing.assert_array_equal(*outputs)
    np.testing.assert_array_equal(ours(x).numpy(), reference(x).numpy())  # eager


@pytest.mark.parametrize("change", ["synchronized", "not trainable", "renorm"])
def test_keras_call_where_the_fused_kernel_would_differ(change):
    kwargs = {"renorm": True} if change == "renorm" else {}
    reference, ours = norm_pair(momentum=MOMENTUM, **kwargs)
    for layer in (reference, ours):
        if change == "synchronized":
            layer.synchronized = True  # as the trainer sets it with several replicas
        if change == "not trainable":
            layer.trainable = False  # a frozen batch norm normalises with its moving statistics
    x = batches(1)[0]
    assert FUSED not in op_types(ours, x, training=True)
    for e, g in zip(training_calls(reference, [x])[0], training_calls(ours, [x])[0], strict=True):
        np.testing.assert_array_equal(g, e)
    for e, g in zip(reference.weights, ours.weights, strict=True):
        np.testing.assert_array_equal(g.numpy(), e.numpy())


def test_masked_and_3d_inputs_take_keras_call():
    ours = BatchNormalization()
    x = tf.zeros((2, 5, 3))
    ours.build(x.shape)
    assert FUSED not in op_types(ours, x, training=True)
    masked = tf.function(lambda x: ours(x, training=True, mask=tf.ones((2, 5), bool)))
    assert FUSED not in {op.type for op in masked.get_concrete_function(x).graph.get_operations()}


def test_unet_uses_it():
    model = build_unet(3, input_shape=(16, 16, 3), depth=1, base_filters=4, stem_stride=2)
    norms = [layer for layer in model.layers if layer.name.split("_")[-1].startswith("bn")]
    assert norms and all(type(layer) is BatchNormalization for layer in norms)


def tiny_unet(seed):
    keras.utils.set_random_seed(seed)
    return build_unet(3, input_shape=(16, 16, 3), depth=1, base_filters=4, stem_stride=2)


def trained(model):
    """A few training calls: moving statistics away from their initial values."""
    images = tf.constant(np.random.default_rng(3).uniform(0, 1, (2, 16, 16, 3)), tf.float32)
    for _ in range(2):
        model(images, training=True)
    return model


def keras_norm_unet(monkeypatch, seed):
    """The UNet as it was built before: Keras' BatchNormalization."""
    with monkeypatch.context() as patch:
        patch.setattr(unet, "BatchNormalization", keras.layers.BatchNormalization)
        model = tiny_unet(seed)
    assert not any(isinstance(layer, BatchNormalization) for layer in model.layers)
    return model


def test_keras_files_load_both_ways(monkeypatch, tmp_path):
    images = tf.constant(np.random.default_rng(4).uniform(0, 1, (1, 16, 16, 3)), tf.float32)
    before, after = keras_norm_unet(monkeypatch, seed=5), tiny_unet(seed=6)
    for name, source, target in (("keras_norm", before, after), ("fused_norm", after, before)):
        trained(source)
        path = tmp_path / f"{name}.keras"
        source.save(path)
        target.load_weights(path)
        for a, b in zip(source.weights, target.weights, strict=True):
            assert a.path == b.path
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        np.testing.assert_array_equal(target(images).numpy(), source(images).numpy())
    loaded = keras.saving.load_model(tmp_path / "fused_norm.keras", compile=False)
    assert any(type(layer) is BatchNormalization for layer in loaded.layers)


def test_litert_export_has_the_same_ops(monkeypatch, tmp_path):
    before = trained(keras_norm_unet(monkeypatch, seed=7))
    after = tiny_unet(seed=8)
    after.set_weights(before.get_weights())
    reports = []
    for model in (before, after):
        path = tmp_path / f"{len(reports)}.tflite"
        export.deployment_model(model, (16, 16)).export(
            path, format="litert", verbose=False,
            input_signature=[keras.InputSpec(shape=(1, 16, 16, 3), dtype="float32")], **export.litert_options("none"))
        reports.append(export.litert_op_report(path))
    assert reports[1] == reports[0]
    assert not [op for op in reports[1]["ops"] if op.startswith("Flex") or "CUSTOM" in op.upper()]
