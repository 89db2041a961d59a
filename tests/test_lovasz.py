"""Lovasz-Softmax against a numpy transcription of the reference algorithm (Berman et al., CVPR 2018,
Alg. 1: a sort of each class's errors), its gradient against finite differences of that
transcription, in a weighted sum, and under gradient accumulation and two replicas.

keras_seg's loss bins the errors into levels instead of sorting them: it equals the reference when
no two errors of a class share a level (`shared_levels` checks that the exact cases are such), and
lies within 2 / levels of it otherwise."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seg import distribute
from keras_seg.losses import CrossEntropyLoss, LovaszSoftmaxLoss, build_loss, parse_loss_spec
from test_accumulate import assert_micro_batches_add_up
from test_replicas import loss_and_gradient_on_replicas

IGNORE = 255


# --------------------------------------------------------------------------- numpy reference


def np_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def np_lovasz_grad(fg_sorted):
    """The Lovasz extension's gradient of the Jaccard loss at errors sorted in decreasing order:
    J_k = 1 - (|fg| - fg among the first k+1) / (|fg| + background among them), then J_k - J_{k-1}."""
    total = fg_sorted.sum()
    intersection = total - np.cumsum(fg_sorted)
    union = total + np.cumsum(1.0 - fg_sorted)
    jaccard = 1.0 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def np_lovasz_flat(probs, labels, classes, weights=None):
    """probs [P, C] and labels [P] of valid pixels: the (weighted) mean over the counted classes of
    dot(errors sorted in decreasing order, lovasz_grad(their foreground indicator))."""
    if labels.size == 0:
        return 0.0
    values, class_weights = [], []
    for c in range(probs.shape[1]):
        fg = (labels == c).astype(np.float64)
        if classes == "present" and fg.sum() == 0:
            continue
        errors = np.abs(fg - probs[:, c])
        order = np.argsort(-errors, kind="stable")
        values.append(float(errors[order] @ np_lovasz_grad(fg[order])))
        class_weights.append(1.0 if weights is None else float(weights[c]))
    if not values or sum(class_weights) == 0:
        return 0.0
    return float(np.dot(values, class_weights) / sum(class_weights))


def np_lovasz(labels, logits, per_image, classes="present", weights=None):
    """Per image: the mean over images that hold a valid pixel; per batch: all valid pixels together."""
    labels = np.asarray(labels).reshape(len(labels), -1)
    probs = np_softmax(logits).reshape(len(labels), labels.shape[1], -1)
    if not per_image:
        valid = labels != IGNORE
        return np_lovasz_flat(probs[valid], labels[valid], classes, weights)
    values = [np_lovasz_flat(p[y != IGNORE], y[y != IGNORE], classes, weights)
              for p, y in zip(probs, labels) if (y != IGNORE).any()]
    return float(np.mean(values)) if values else 0.0


def shared_levels(labels, logits, levels):
    """How many (class, level) bins hold more than one valid pixel's error, over the whole batch
    (a bin of one image is a bin of the batch too)."""
    labels = np.asarray(labels).reshape(-1)
    probs = np_softmax(logits).reshape(labels.size, -1)[labels != IGNORE]
    labels = labels[labels != IGNORE]
    shared = 0
    for c in range(probs.shape[1]):
        errors = np.abs((labels == c) - probs[:, c])
        level = np.minimum((errors.astype(np.float32) * levels).astype(np.int64), levels - 1)
        shared += int((np.bincount(level) > 1).sum())
    return shared


EXACT_LEVELS = 2**16  # the small cases' errors fall in distinct levels (asserted)
EXACT = {name: {"levels": EXACT_LEVELS} for name in ("lovasz", "lovasz_image", "lovasz_all", "lovasz_image_all")}


# --------------------------------------------------------------------------- cases


def make_case(seed=0, images=3, height=5, width=6, num_classes=4):
    """Ignored pixels in every image; class 3 never appears, class 2 only in image 1; image 2 (if
    any) is mostly ignored."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, (images, height, width)).astype(np.uint8)
    labels[1, 1:3, 2:5] = 2
    labels[0, 0, :4] = IGNORE
    labels[1, 4, 1] = IGNORE
    if images > 2:
        labels[2, : height - 1] = IGNORE
    logits = rng.normal(scale=2.0, size=(images, height, width, num_classes)).astype(np.float32)
    return labels, logits


def test_the_reference_transcription_on_a_hand_computed_case():
    """One class, errors [0.9 (bg), 0.6 (fg), 0.2 (fg)]: |fg| = 2. S = {bg}: 1 / 3; S + fg: 2 / 3;
    all: 3 / 3. Gradient [1/3, 1/3, 1/3]; loss (0.9 + 0.6 + 0.2) / 3."""
    fg = np.array([0.0, 1.0, 1.0])
    np.testing.assert_allclose(np_lovasz_grad(fg), [1 / 3, 1 / 3, 1 / 3])
    class_0_probs = np.array([[0.9], [0.4], [0.8]])  # labels [1, 0, 0]: errors 0.9, 0.6, 0.2
    assert np_lovasz_flat(class_0_probs, np.array([1, 0, 0]), "all") == pytest.approx(1.7 / 3)


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("classes", ["present", "all"])
def test_matches_the_reference(per_image, classes):
    labels, logits = make_case()
    assert shared_levels(labels, logits, EXACT_LEVELS) == 0
    expected = np_lovasz(labels, logits, per_image, classes)
    loss = LovaszSoftmaxLoss(per_image=per_image, classes=classes, levels=EXACT_LEVELS)
    assert float(loss(labels, logits)) == pytest.approx(expected, rel=1e-5)
    assert float(loss.from_statistics(loss.statistics(labels, logits))) == pytest.approx(expected, rel=1e-5)
    # The [B, H, W, 1] float masks Keras may hand over.
    assert float(loss(labels[..., None].astype(np.float32), logits)) == pytest.approx(expected, rel=1e-5)


def test_per_image_differs_from_per_batch_and_absent_classes_count_only_with_all():
    """The options change the value: not a test that passes whatever the option does."""
    labels, logits = make_case(seed=3)
    values = {(p, c): float(LovaszSoftmaxLoss(per_image=p, classes=c)(labels, logits))
              for p in (False, True) for c in ("present", "all")}
    assert len({round(v, 6) for v in values.values()}) == 4, values


def test_class_weights_weight_the_mean_over_classes():
    labels, logits = make_case(seed=10)
    assert shared_levels(labels, logits, EXACT_LEVELS) == 0
    weights = [0.5, 2.0, 1.0, 3.0]
    for per_image in (False, True):
        for classes in ("present", "all"):
            loss = LovaszSoftmaxLoss(per_image=per_image, classes=classes, class_weights=weights, levels=EXACT_LEVELS)
            expected = np_lovasz(labels, logits, per_image, classes, weights)
            assert float(loss(labels, logits)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("classes", ["present", "all"])
def test_tied_errors_in_one_level_give_the_reference_value(per_image, classes):
    """Pixels with equal logits tie: a foreground and a background error of class 0 (and of
    class 1) are both 0.5 and share a level, as are the two largest errors of the absent class 2.
    The Lovasz extension does not depend on the order of equal errors, so the level-by-level
    value is the reference's exactly."""
    labels = np.array([[[0, 1, 0], [1, 0, 1]], [[1, 0, IGNORE], [0, 1, 1]]], np.uint8)
    pixels = [[0, 0, -30], [0, 0, -30], [0, 0, 1], [0, 0, 1], [2, -1, 0], [-1, 1.5, 0.5]]
    logits = np.array(pixels + pixels[::-1], np.float32).reshape(2, 2, 3, 3)
    assert shared_levels(labels, logits, 4096) > 0
    expected = np_lovasz(labels, logits, per_image, classes)
    assert float(LovaszSoftmaxLoss(per_image=per_image, classes=classes)(labels, logits)) == pytest.approx(
        expected, rel=1e-6)


@pytest.mark.parametrize("levels", [4096, 64, 8])
def test_with_shared_levels_the_value_is_within_two_levels_of_the_reference(levels):
    """A 2 x 96 x 128 batch of 6 classes (24,576 errors per class): many errors share a level. The
    bound is 2 / levels; at 8 levels the difference shows (so the comparison has teeth)."""
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 6, (2, 96, 128)).astype(np.uint8)
    labels[:, :10] = IGNORE
    logits = rng.normal(size=(2, 96, 128, 6)).astype(np.float32)
    assert shared_levels(labels, logits, levels) > 0
    for per_image in (False, True):
        for classes in ("present", "all"):
            expected = np_lovasz(labels, logits, per_image, classes)
            value = float(LovaszSoftmaxLoss(per_image=per_image, classes=classes, levels=levels)(labels, logits))
            assert abs(value - expected) <= 2 / levels, (per_image, classes, value, expected)
            if levels == 8:
                assert abs(value - expected) > 1e-4


def test_perfect_prediction_gives_zero_and_all_ignored_gives_zero():
    labels = np.array([[[0, 1], [2, IGNORE]]], np.uint8)
    logits = np.where(labels[..., None] == np.arange(3), 30.0, -30.0).astype(np.float32)
    for per_image in (False, True):
        for classes in ("present", "all"):
            loss = LovaszSoftmaxLoss(per_image=per_image, classes=classes)
            assert float(loss(labels, logits)) == pytest.approx(0.0, abs=1e-6)
            assert float(loss(np.full_like(labels, IGNORE), logits)) == 0.0


def test_an_all_ignored_image_is_left_out_of_the_per_image_mean():
    labels, logits = make_case(seed=2)
    assert shared_levels(labels, logits, EXACT_LEVELS) == 0
    with_void = np.concatenate([labels, np.full_like(labels[:1], IGNORE)])
    void_logits = np.concatenate([logits, logits[:1]])
    loss = LovaszSoftmaxLoss(per_image=True, levels=EXACT_LEVELS)
    assert float(loss(with_void, void_logits)) == pytest.approx(np_lovasz(labels, logits, True), rel=1e-5)


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("classes", ["present", "all"])
def test_gradient_matches_finite_differences_of_the_reference(per_image, classes):
    """Autodiff of the TensorFlow loss against central differences of the float64 numpy
    transcription (the loss is piecewise smooth: random logits sit away from ties)."""
    labels = np.array([[[IGNORE, 0, 1], [1, 0, 0]], [[2, 1, 1], [0, IGNORE, 1]]], np.uint8)  # class 2 in image 1 only
    logits = np.random.default_rng(4).normal(scale=2.0, size=(2, 2, 3, 3)).astype(np.float32)
    assert shared_levels(labels, logits, 4096) == 0  # the default levels
    weights = [1.0, 2.0, 0.5]
    variable = tf.Variable(logits)
    loss = LovaszSoftmaxLoss(per_image=per_image, classes=classes, class_weights=weights)
    with tf.GradientTape() as tape:
        value = loss(labels, variable)
    gradient = tape.gradient(value, variable).numpy()
    reference = logits.astype(np.float64)
    numeric = np.zeros_like(reference)
    step = 1e-6
    for index in np.ndindex(reference.shape):
        plus, minus = reference.copy(), reference.copy()
        plus[index] += step
        minus[index] -= step
        numeric[index] = (np_lovasz(labels, plus, per_image, classes, weights)
                          - np_lovasz(labels, minus, per_image, classes, weights)) / (2 * step)
    assert np.abs(numeric).max() > 1e-2  # the loss moves with the logits
    np.testing.assert_allclose(gradient, numeric, rtol=1e-3, atol=2e-6)
    assert (gradient[0, 0, 0] == 0).all()  # the ignored pixel


# --------------------------------------------------------------------------- specs, weighted sums


def test_spec_names_reach_the_options():
    assert parse_loss_spec("ce+0.5*lovasz_image") == [(1.0, "ce"), (0.5, "lovasz_image")]
    for name, per_image, classes in [("lovasz", False, "present"), ("lovasz_image", True, "present"),
                                     ("lovasz_all", False, "all"), ("lovasz_image_all", True, "all")]:
        loss = build_loss(name)
        assert isinstance(loss, LovaszSoftmaxLoss)
        assert (loss.per_image, loss.classes) == (per_image, classes)
    with pytest.raises(ValueError, match="lovasz classes"):
        LovaszSoftmaxLoss(classes="absent")
    with pytest.raises(ValueError, match="lovasz levels"):
        LovaszSoftmaxLoss(levels=1)
    assert build_loss("lovasz_image", lovasz_image={"levels": 256}).levels == 256
    with pytest.raises(ValueError, match="lovasz_image"):  # the error lists the names
        parse_loss_spec("lovasz_images")


@pytest.mark.parametrize("spec,terms", [("ce+lovasz", [(1.0, False)]), ("ce+0.5*lovasz_image", [(0.5, True)]),
                                        ("0.25*ce+2*lovasz+lovasz_image", [(2.0, False), (1.0, True)])])
def test_combined_loss_is_the_weighted_sum(spec, terms):
    labels, logits = make_case(seed=6)
    assert shared_levels(labels, logits, EXACT_LEVELS) == 0
    weights = [1.0, 0.5, 2.0, 1.5]
    combined = build_loss(spec, class_weights=weights, **EXACT)
    ce_weight = parse_loss_spec(spec)[0][0]
    ce = float(CrossEntropyLoss(class_weights=weights)(labels, logits))
    expected = ce_weight * ce + sum(w * np_lovasz(labels, logits, p, "present", weights) for w, p in terms)
    assert float(combined(labels, logits)) == pytest.approx(expected, rel=1e-5)
    assert float(combined.from_statistics(combined.statistics(labels, logits))) == pytest.approx(expected, rel=1e-5)
    assert combined.NEEDS_TOTALS == any(not per_image for _, per_image in terms)  # per batch: histograms

    # And its gradient is the weighted sum of the terms' gradients.
    variable = tf.Variable(logits)
    with tf.GradientTape(persistent=True) as tape:
        total = combined(labels, variable)
        parts = [weight * term(labels, variable) for weight, term in combined.losses]
    np.testing.assert_allclose(tape.gradient(total, variable), sum(tape.gradient(p, variable) for p in parts),
                               rtol=1e-5, atol=1e-8)


def test_round_trips_through_config_and_trains_under_fit():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
    masks = rng.integers(0, 3, (4, 8, 8)).astype(np.uint8)
    masks[:, 0] = IGNORE
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(3, 1)])
    loss = build_loss("ce+0.5*lovasz_image_all", class_weights=[1.0, 2.0, 1.0])
    model.compile(optimizer="sgd", loss=loss)
    history = model.fit(images, masks, epochs=1, batch_size=2, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    logits = model.predict(images, verbose=0)
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert float(restored(masks, logits)) == pytest.approx(float(loss(masks, logits)), rel=1e-6)
    single = LovaszSoftmaxLoss(per_image=True, classes="all", levels=512)
    single = keras.losses.deserialize(keras.losses.serialize(single))
    assert (single.per_image, single.classes, single.levels) == (True, "all", 512)


def test_float16_logits_give_finite_float32_values_and_gradients():
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        labels = np.array([[[0, 1], [2, IGNORE]]], np.uint8)
        logits = np.array([[[[6e4, -6e4, 0], [6e4, -6e4, 6e4]], [[-6e4, 6e4, -6e4], [6e4, 0, -6e4]]]], np.float16)
        variable = tf.Variable(logits)
        with tf.GradientTape() as tape:
            value = build_loss("ce+lovasz")(labels, variable)
        gradient = tape.gradient(value, variable)
    finally:
        keras.mixed_precision.set_dtype_policy(previous)
    assert value.dtype == tf.float32 and np.isfinite(value.numpy()) and value.numpy() > 0
    assert np.isfinite(gradient.numpy()).all()


@pytest.mark.parametrize("spec", ["lovasz", "lovasz_image_all"])
def test_compiles_inside_an_xla_step(spec):
    """`--jit` compiles the whole training step with XLA: the loss and its gradient there are the
    same as outside."""
    labels, logits = make_case(seed=11)
    loss = build_loss(spec)
    variable = tf.Variable(logits)

    def value_and_gradient():
        with tf.GradientTape() as tape:
            value = loss(labels, variable)
        return value, tape.gradient(value, variable)

    expected, expected_grad = value_and_gradient()
    value, grad = tf.function(value_and_gradient, jit_compile=True)()
    assert float(value) == pytest.approx(float(expected), rel=1e-5)
    np.testing.assert_allclose(grad.numpy(), expected_grad.numpy(), rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- accumulation, replicas


def _conv_model(classes):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((5, 6, 3)), keras.layers.Conv2D(classes, 1)])


@pytest.mark.parametrize("spec", ["lovasz", "lovasz_image", "ce+0.5*lovasz_all", "dice+lovasz_image_all"])
def test_micro_batches_add_up_to_the_whole_batch(spec):
    """The trainer's --accumulate path (`step_totals`): micro-batches of 2 and 1 images, the first
    with an all-ignored image and class 2 in the second only. Per image, normalised by the step's
    image count (from the masks); per batch, at the step's histograms (from a first forward pass,
    as Dice). Their gradients add up to the whole batch's, and the loss is the whole batch's."""
    labels, _ = make_case(seed=7)
    labels[0] = IGNORE  # an image that does not count
    labels[1, labels[1] == 2] = 0
    labels[2, -1, :3] = 2
    images = np.random.default_rng(7).normal(size=(3, 5, 6, 3)).astype(np.float32)
    weights = [0.5, 1.0, 2.0, 1.5]
    loss_fn = build_loss(spec, class_weights=weights, **EXACT)
    model = _conv_model(4)

    whole_loss = assert_micro_batches_add_up(loss_fn, model, images, labels, [slice(0, 2), slice(2, 3)], atol=1e-7)
    if spec in ("lovasz", "lovasz_image"):  # and the whole batch's value is the reference's
        logits = model(images).numpy()
        assert shared_levels(labels, logits, EXACT_LEVELS) == 0
        expected = np_lovasz(labels, logits, spec == "lovasz_image", "present", weights)
        assert float(whole_loss) == pytest.approx(expected, rel=1e-5)


def test_per_batch_is_not_the_mean_of_micro_batch_losses():
    """What the step's histograms are for: the mean of the micro-batches' own Lovasz differs."""
    labels, logits = make_case(seed=8, images=4)
    loss_fn = LovaszSoftmaxLoss()
    whole = float(loss_fn(labels, logits))
    own = np.mean([float(loss_fn(labels[p], logits[p])) for p in (slice(0, 2), slice(2, 4))])
    assert abs(whole - own) > 1e-3


@pytest.fixture(scope="module")
def strategy():
    return distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])


@pytest.mark.parametrize("spec", ["lovasz", "lovasz_image", "ce+lovasz_image_all", "lovasz_all"])
def test_on_two_replicas_the_loss_is_the_global_batch_loss(strategy, spec):
    """Image r on replica r; class 2 is in image 1 only. Each replica's value is the whole batch's,
    and their gradients are its gradient (per batch: the replicas' histograms are summed)."""
    labels, logits = make_case(seed=9, images=2)
    loss_fn = build_loss(spec, class_weights=[1.0, 2.0, 0.5, 1.0], **EXACT)
    variable = tf.Variable(logits)
    with tf.GradientTape() as tape:
        expected = loss_fn(labels, variable)
    expected_grad = tape.gradient(expected, variable).numpy()
    values, grads = loss_and_gradient_on_replicas(strategy, loss_fn, labels, logits)
    assert values == pytest.approx([float(expected)] * 2, rel=1e-5)
    np.testing.assert_allclose(grads, expected_grad, rtol=1e-4, atol=1e-7)
    if spec == "lovasz":
        assert shared_levels(labels, logits, EXACT_LEVELS) == 0
        assert values[0] == pytest.approx(np_lovasz(labels, logits, False, "present", [1.0, 2.0, 0.5, 1.0]), rel=1e-5)
        per_replica = [float(loss_fn(labels[i: i + 1], logits[i: i + 1])) for i in range(2)]
        assert abs(values[0] - np.mean(per_replica)) > 1e-3  # not the mean of each replica's own


# --------------------------------------------------------------------------- through the trainer


def test_the_command_line_takes_lovasz_specs():
    from keras_seg import train as train_cli
    from keras_seg.config import ConfigError

    def resolve(loss):
        args = train_cli.build_parser().parse_args(["--preset", "unet_small", "--iters", "1", "--loss", loss])
        return train_cli.resolve_config(args)

    assert resolve("ce+0.5*lovasz_image").loss == "ce+0.5*lovasz_image"
    with pytest.raises(ConfigError, match="--loss: bad loss term 'lovasz_pixel'"):
        resolve("ce+lovasz_pixel")


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from keras_seg import demo

    return demo.write_demo_dataset(str(tmp_path_factory.mktemp("demo") / "data"), splits={"train": 4, "val": 2},
                                   size=(64, 128), log=lambda _: None)


def _training_args(data, output, batch, accumulate, spec):
    return ["--preset", "unet_small", "--data", data, "--output", str(output), "--no-progress",
            "--image-size", "64x128", "--model-arg", "depth=3", "--model-arg", "base_filters=8",
            "--model-arg", "batch_norm=false", "--precision", "float32", "--strategy", "one", "--cache", "memory",
            "--seed", "1", "--iters", "1", "--no-augment", "--optimizer", "sgd", "--learning-rate", "0.5",
            "--warmup-iters", "0", "--clipnorm", "0", "--loss", spec, "--no-export", "--batch-size", batch,
            "--accumulate", accumulate, "--val-batch-size", "2"]


def _one_training_step(data, output, batch, accumulate, spec):
    """`keras-seg-train` for one step (the public entry point: the trainer's insides are being
    reorganised); the step's loss from history.csv and the weights it saved."""
    import csv

    from keras_seg import train as train_cli

    assert train_cli.main(_training_args(data, output, batch, accumulate, spec)) == 0
    with open(output / "history.csv", newline="") as f:
        loss = float(list(csv.DictReader(f))[-1]["loss"])
    return loss, keras.saving.load_model(output / "last.keras", compile=False).get_weights()


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["0.1*ce+lovasz", "0.1*ce+lovasz_image"])
def test_accumulated_lovasz_step_equals_one_batch(demo_data, tmp_path, spec):
    """`--accumulate 2 --batch-size 2` against `--batch-size 4`: the same 4 images make the first
    step (the same seed and examples per step), so the step's loss and the weights after it agree,
    per batch (the step's histograms, from a first forward pass) and per image (no batch norm: its
    statistics are the micro-batch's by design)."""
    from keras_seg import train as train_cli
    from keras_seg.models.presets import build_model

    one_loss, one = _one_training_step(demo_data, tmp_path / "one", "4", "1", spec)
    acc_loss, accumulated = _one_training_step(demo_data, tmp_path / "acc", "2", "2", spec)
    config = train_cli.resolve_config(train_cli.build_parser().parse_args(
        _training_args(demo_data, tmp_path / "x", "4", "1", spec)))
    keras.utils.set_random_seed(config.seed)  # the trainer's initial weights, as tests/test_accumulate.py makes them
    start = build_model({"model": config.model, "input_size": (64, 128)}, 19).get_weights()
    moved = max(np.abs(a - b).max() for a, b in zip(start, one))
    assert moved > 1e-3  # the step changed the weights
    for a, b in zip(one, accumulated):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * moved)  # relative to the update itself
    np.testing.assert_allclose(acc_loss, one_loss, rtol=1e-5)
