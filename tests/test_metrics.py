"""Metrics against numpy references computed here from the label arrays, pixel by pixel."""

import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seg import distribute, metrics
from keras_seg.callbacks import PerClassMetricsLogger
from keras_seg.metrics import MeanDice, MeanIoU, PixelAccuracy

IGNORE = 255
NAN = float("nan")

# The 19 Cityscapes trainId classes and the official category sets, written out independently of labels.py.
TRAINID_NAMES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]  # fmt: skip
CATEGORY_SETS = {
    "flat": ["road", "sidewalk"],
    "construction": ["building", "wall", "fence"],
    "object": ["pole", "traffic light", "traffic sign"],
    "nature": ["vegetation", "terrain"],
    "sky": ["sky"],
    "human": ["person", "rider"],
    "vehicle": ["car", "truck", "bus", "train", "motorcycle", "bicycle"],
}


# --------------------------------------------------------------------------- references


def reference_scores(labels, predictions, num_classes):
    """Per-class IoU, accuracy and Dice from pixel sets; NaN where undefined."""
    labels, predictions = np.asarray(labels).ravel(), np.asarray(predictions).ravel()
    valid = labels != IGNORE
    iou, acc, dice = [], [], []
    for c in range(num_classes):
        is_true, is_pred = (labels == c) & valid, (predictions == c) & valid
        inter, union = np.sum(is_true & is_pred), np.sum(is_true | is_pred)
        iou.append(inter / union if union else NAN)
        acc.append(inter / is_true.sum() if is_true.sum() else NAN)
        dice.append(2 * inter / (is_true.sum() + is_pred.sum()) if union else NAN)
    pixel_acc = np.sum((labels == predictions) & valid) / valid.sum()
    return np.array(iou), np.array(acc), np.array(dice), pixel_acc


def nanmean(values):
    present = [v for v in values if not math.isnan(v)]
    return sum(present) / len(present)


def logits_for(predictions, num_classes, rng=None):
    """Random logits whose arg-max is `predictions`."""
    rng = rng or np.random.default_rng(0)
    logits = rng.normal(size=predictions.shape + (num_classes,)).astype(np.float32)
    return logits + 10.0 * np.eye(num_classes, dtype=np.float32)[predictions]


@pytest.fixture
def case():
    """4 classes: 3 is absent from labels and predictions, 2 is predicted but absent from the labels."""
    labels = np.array([[[0, 0, 1, IGNORE], [1, 1, 0, IGNORE]], [[0, 1, 1, 0], [IGNORE, 0, 0, 1]]], np.uint8)
    predictions = np.array([[[0, 1, 1, 3], [1, 2, 0, 0]], [[0, 1, 0, 0], [2, 0, 2, 1]]], np.int64)
    return labels, predictions


def test_hand_made_case_values(case):
    labels, predictions = case
    cm = metrics.confusion_matrix(labels, predictions, 4)
    # 7 pixels of class 0: 5 right, 1 -> 1, 1 -> 2; 6 of class 1: 4 right, 1 -> 0, 1 -> 2 (ignored pixels dropped)
    np.testing.assert_array_equal(cm, [[5, 1, 1, 0], [1, 4, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(metrics.per_class_iou(cm), [5 / 8, 4 / 7, 0.0, NAN])
    np.testing.assert_allclose(metrics.per_class_accuracy(cm), [5 / 7, 4 / 6, NAN, NAN])
    np.testing.assert_allclose(metrics.per_class_dice(cm), [10 / 13, 8 / 11, 0.0, NAN])
    assert metrics.mean_iou(cm) == pytest.approx((5 / 8 + 4 / 7 + 0.0) / 3)
    assert metrics.mean_accuracy(cm) == pytest.approx((5 / 7 + 4 / 6) / 2)
    assert metrics.mean_dice(cm) == pytest.approx((10 / 13 + 8 / 11) / 3)
    assert metrics.pixel_accuracy(cm) == pytest.approx(9 / 13)


def test_numpy_functions_match_pixel_reference():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 6, (3, 17, 9))
    labels[rng.random(labels.shape) < 0.2] = IGNORE
    predictions = rng.integers(0, 5, labels.shape)  # class 5 never predicted
    cm = metrics.confusion_matrix(labels, predictions, 6)
    iou, acc, dice, pixel_acc = reference_scores(labels, predictions, 6)
    np.testing.assert_allclose(metrics.per_class_iou(cm), iou)
    np.testing.assert_allclose(metrics.per_class_accuracy(cm), acc)
    np.testing.assert_allclose(metrics.per_class_dice(cm), dice)
    assert metrics.pixel_accuracy(cm) == pytest.approx(pixel_acc)
    assert metrics.mean_iou(cm) == pytest.approx(nanmean(iou))


def test_perfect_and_all_wrong(case):
    labels, _ = case
    perfect = np.where(labels == IGNORE, 3, labels)
    cm = metrics.confusion_matrix(labels, perfect, 4)
    np.testing.assert_allclose(metrics.per_class_iou(cm), [1.0, 1.0, NAN, NAN])
    assert metrics.mean_iou(cm) == 1.0 and metrics.pixel_accuracy(cm) == 1.0
    wrong = np.where(labels == 0, 1, 0)
    cm = metrics.confusion_matrix(labels, wrong, 4)
    np.testing.assert_allclose(metrics.per_class_iou(cm), [0.0, 0.0, NAN, NAN])
    assert metrics.mean_iou(cm) == 0.0 and metrics.pixel_accuracy(cm) == 0.0


def test_empty_matrix_gives_nan_in_numpy_and_zero_in_keras():
    cm = np.zeros((3, 3), np.int64)
    assert math.isnan(metrics.mean_iou(cm)) and math.isnan(metrics.pixel_accuracy(cm))
    metric = MeanIoU(3)
    metric.update_state(np.full((1, 2, 2), IGNORE, np.uint8), np.zeros((1, 2, 2, 3), np.float32))
    assert float(metric.result()) == 0.0


# --------------------------------------------------------------------------- Keras metrics


@pytest.mark.parametrize(
    "metric_class,reference",
    [
        (MeanIoU, lambda r: nanmean(r[0])),
        (PixelAccuracy, lambda r: r[3]),
        (MeanDice, lambda r: nanmean(r[2])),
    ],
)
def test_keras_metrics_stream_over_batches(metric_class, reference):
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 5, (6, 12, 10)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.15] = IGNORE
    predictions = np.where(rng.random(labels.shape) < 0.6, labels % 5, rng.integers(0, 5, labels.shape))
    metric = metric_class(num_classes=5)
    for start in range(0, 6, 2):  # three batches of two images
        metric.update_state(labels[start : start + 2], logits_for(predictions[start : start + 2], 5))
    expected = reference(reference_scores(labels, predictions, 5))
    assert float(metric.result()) == pytest.approx(expected, rel=1e-6)
    np.testing.assert_array_equal(metric.confusion_matrix(), metrics.confusion_matrix(labels, predictions, 5))
    metric.reset_state()
    assert metric.confusion_matrix().sum() == 0


def test_metric_input_forms(case):
    labels, predictions = case
    expected = metrics.confusion_matrix(labels, predictions, 4)
    forms = [
        (labels, logits_for(predictions, 4)),
        (labels[..., None].astype(np.float32), logits_for(predictions, 4)),  # Keras may give float [B, H, W, 1]
        (labels.astype(np.int32), predictions),  # class indices instead of logits
        (labels, predictions[..., None]),
    ]
    for y_true, y_pred in forms:
        metric = MeanIoU(4)
        metric.update_state(y_true, y_pred)
        np.testing.assert_array_equal(metric.confusion_matrix(), expected)
        np.testing.assert_allclose(metric.per_class_iou(), metrics.per_class_iou(expected))


def test_metric_sample_weight(case):
    labels, predictions = case
    metric = PixelAccuracy(4)
    metric.update_state(labels, logits_for(predictions, 4), sample_weight=np.array([1.0, 0.0]))
    iou, acc, dice, pixel_acc = reference_scores(labels[:1], predictions[:1], 4)
    assert float(metric.result()) == pytest.approx(pixel_acc)


def test_metric_update_compiles_under_xla_and_matches_the_reference():
    rng = np.random.default_rng(4)
    labels = rng.choice([0, 1, 2, 3, IGNORE], size=(2, 16, 24)).astype(np.uint8)
    predictions = rng.integers(0, 4, size=(2, 16, 24))
    metric = MeanIoU(4)

    @tf.function(jit_compile=True)
    def update(y_true, y_pred):
        metric.update_state(y_true, y_pred)

    update(labels, logits_for(predictions, 4))
    iou, _, _, _ = reference_scores(labels, predictions, 4)
    np.testing.assert_allclose(float(metric.result()), nanmean(iou), rtol=1e-6)


def test_metric_config_round_trip():
    metric = MeanIoU(7, ignore_index=0, name="miou")
    clone = MeanIoU.from_config(metric.get_config())
    assert (clone.num_classes, clone.ignore_index, clone.name) == (7, 0, "miou")


def test_metric_under_mirrored_strategy_equals_single_device():
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 4, (8, 6, 5)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.2] = IGNORE
    logits = rng.normal(size=(8, 6, 5, 4)).astype(np.float32)

    single = MeanIoU(4)
    single.update_state(labels, logits)

    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        distributed = MeanIoU(4)
        model = keras.Sequential([keras.Input((6, 5, 4)), keras.layers.Identity()])
        model.compile(metrics=[distributed], loss=lambda y_true, y_pred: keras.ops.mean(y_pred) * 0.0)
    results = model.evaluate(logits, labels, batch_size=4, return_dict=True, verbose=0)

    np.testing.assert_array_equal(distributed.confusion_matrix(), single.confusion_matrix())
    assert results["mean_iou"] == pytest.approx(float(single.result()), rel=1e-6)

    # The same through a hand-written replica loop.
    distributed.reset_state()
    dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((labels, logits)).batch(4))

    @tf.function
    def update(y_true, y_pred):
        strategy.run(distributed.update_state, args=(y_true, y_pred))

    for y_true, y_pred in dataset:
        update(y_true, y_pred)
    np.testing.assert_array_equal(distributed.confusion_matrix(), single.confusion_matrix())
    assert float(distributed.result()) == pytest.approx(float(single.result()), rel=1e-6)


# --------------------------------------------------------------------------- Cityscapes categories


def test_category_miou_matches_category_reference():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 19, (2, 20, 20))
    labels[rng.random(labels.shape) < 0.1] = IGNORE
    predictions = np.where(rng.random(labels.shape) < 0.5, labels % 19, rng.integers(0, 19, labels.shape))

    category_of = {}
    for index, names in enumerate(CATEGORY_SETS.values()):
        for name in names:
            category_of[TRAINID_NAMES.index(name)] = index
    to_category = np.vectorize(lambda v: category_of.get(int(v), IGNORE))
    iou, *_ = reference_scores(to_category(labels), to_category(predictions), 7)

    cm = metrics.confusion_matrix(labels, predictions, 19)
    category_cm = metrics.confusion_matrix(to_category(labels), to_category(predictions), 7)
    np.testing.assert_array_equal(metrics.cityscapes_category_matrix(cm), category_cm)
    np.testing.assert_allclose(metrics.per_class_iou(metrics.cityscapes_category_matrix(cm)), iou)
    assert metrics.category_mean_iou(cm) == pytest.approx(nanmean(iou))
    with pytest.raises(ValueError, match="19x19"):
        metrics.cityscapes_category_matrix(np.zeros((7, 7)))


def test_category_confusion_within_a_category_counts_as_correct():
    # A person predicted as rider is wrong for the classes, right for the category "human".
    labels = np.array([[TRAINID_NAMES.index("person")] * 4])
    predictions = np.array([[TRAINID_NAMES.index("rider")] * 4])
    cm = metrics.confusion_matrix(labels, predictions, 19)
    assert metrics.mean_iou(cm) == 0.0
    assert metrics.category_mean_iou(cm) == 1.0


def test_summarize_confusion(case):
    labels, predictions = case
    cm = metrics.confusion_matrix(labels, predictions, 4)
    summary = metrics.summarize_confusion(cm, ["a", "b", "c", "d"])
    assert summary["miou"] == pytest.approx((5 / 8 + 4 / 7) / 3)
    assert summary["pixel_accuracy"] == pytest.approx(9 / 13)
    assert summary["mean_dice"] == pytest.approx((10 / 13 + 8 / 11) / 3)
    np.testing.assert_allclose(summary["per_class_iou"], [5 / 8, 4 / 7, 0.0, NAN])
    assert "category_miou" not in summary

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 19, (1, 10, 10))
    cm = metrics.confusion_matrix(labels, (labels + 1) % 19, 19)
    for summary in (metrics.summarize_confusion(cm, TRAINID_NAMES), metrics.summarize_confusion(cm, None, "trainid")):
        assert summary["category_miou"] == pytest.approx(metrics.category_mean_iou(cm))
        assert len(summary["per_category_iou"]) == 7


# --------------------------------------------------------------------------- table and callback


def test_format_table(case):
    labels, predictions = case
    table = metrics.format_table(metrics.confusion_matrix(labels, predictions, 4), ["road", "car", "sky", "bus"])
    lines = table.splitlines()
    assert lines[1].split() == ["|", "Class", "|", "IoU", "|", "Acc", "|"]
    assert "| road  |  62.50 |  71.43 |" in lines
    assert "| sky   |   0.00 |      - |" in lines
    assert "| bus   |      - |      - |" in lines
    assert lines[-1].startswith(f"aAcc {100 * 9 / 13:.2f}  mIoU {100 * (5 / 8 + 4 / 7) / 3:.2f}")
    assert len({len(line) for line in lines[:-1]}) == 1  # aligned


def test_callback_prints_table_and_logs_values(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.normal(size=(8, 8, 8, 3)).astype(np.float32)
    masks = rng.integers(0, 19, (8, 8, 8)).astype(np.uint8)
    masks[:, :2] = IGNORE
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(19, 1)])
    miou = MeanIoU(19)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255),
                  metrics=[miou])  # fmt: skip
    printed = []
    callback = PerClassMetricsLogger(TRAINID_NAMES, log_dir=str(tmp_path), print_fn=printed.append)
    csv_path = tmp_path / "history.csv"
    history = model.fit(
        images[:4], masks[:4], validation_data=(images[4:], masks[4:]), epochs=2, batch_size=2, verbose=0,
        callbacks=[callback, keras.callbacks.CSVLogger(str(csv_path))],
    )  # fmt: skip

    cm = metrics.confusion_matrix(masks[4:], model.predict(images[4:], verbose=0).argmax(-1), 19)
    iou, acc, *_ = reference_scores(masks[4:], model.predict(images[4:], verbose=0).argmax(-1), 19)
    logged = history.history
    assert len(printed) == 2 and "traffic light" in printed[-1] and "Cityscapes category mIoU" in printed[-1]
    np.testing.assert_allclose(logged["val_iou/traffic_light"][-1], iou[6])
    np.testing.assert_allclose(logged["val_acc/road"][-1], acc[0])
    np.testing.assert_allclose(logged["val_category_miou"][-1], metrics.category_mean_iou(cm))
    assert logged["val_mean_iou"][-1] == pytest.approx(nanmean(iou), rel=1e-6)
    assert "val_iou/bicycle" in csv_path.read_text().splitlines()[0]
    scalars = read_scalars(tmp_path / "validation")
    assert scalars["epoch_iou/traffic_light", 1] == pytest.approx(iou[6])
    assert scalars["epoch_category_miou", 1] == pytest.approx(metrics.category_mean_iou(cm))


def read_scalars(directory):
    """{(tag, step): value} from the TensorBoard event files in `directory`."""
    from tensorflow.core.util import event_pb2

    scalars = {}
    for name in os.listdir(directory):
        for record in tf.data.TFRecordDataset(str(directory / name)):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                assert value.metadata.plugin_data.plugin_name == "scalars"
                scalars[value.tag, event.step] = float(tf.make_ndarray(value.tensor))
    return scalars


def test_callback_skips_epochs_without_validation():
    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Conv2D(3, 1)])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=[MeanIoU(3)])
    printed = []
    callback = PerClassMetricsLogger(["a", "b", "c"], print_fn=printed.append)
    history = model.fit(np.zeros((2, 4, 4, 3)), np.zeros((2, 4, 4)), epochs=1, verbose=0, callbacks=[callback])
    assert printed == [] and "val_iou/a" not in history.history


def test_callback_requires_a_confusion_matrix_metric():
    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Conv2D(3, 1)])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="no ConfusionMatrixMetric"):
        model.fit(
            np.zeros((2, 4, 4, 3)), np.zeros((2, 4, 4)), validation_data=(np.zeros((2, 4, 4, 3)), np.zeros((2, 4, 4))),
            verbose=0, callbacks=[PerClassMetricsLogger(["a", "b", "c"])],
        )  # fmt: skip
