"""Learning-rate schedules against hand-computed values, weight-decay exclusion, the time-budget planner."""

import math

import keras
import numpy as np
import pytest

from keras_seg.training.cadence import BudgetPlanner
from keras_seg.config import TrainConfig
from keras_seg.training.schedules import WarmupDecaySchedule
from keras_seg.training.step import build_optimizer
from test_train import read_history, tiny_data  # noqa: F401 (fixture)


def lr(schedule, step):
    return float(schedule(step))


def test_warmup_is_linear_from_the_start_ratio():
    # 10 warm-up steps from 0.1 x 0.2 = 0.02 up to 0.2; step 5 is half way: 0.02 + 0.5 * 0.18 = 0.11
    s = WarmupDecaySchedule(0.2, "constant", total_steps=100, warmup_steps=10, warmup_start=0.1)
    assert lr(s, 0) == pytest.approx(0.02)
    assert lr(s, 5) == pytest.approx(0.11)
    assert lr(s, 10) == pytest.approx(0.2)
    assert lr(s, 99) == pytest.approx(0.2)


def test_cosine_with_warmup_at_chosen_steps():
    # decay over steps 10..110 (100 steps) from 1.0 to 0.01
    s = WarmupDecaySchedule(1.0, "cosine", total_steps=110, warmup_steps=10, warmup_start=0.0)
    assert lr(s, 4) == pytest.approx(0.4)
    assert lr(s, 10) == pytest.approx(1.0)
    assert lr(s, 60) == pytest.approx(0.01 + 0.99 * 0.5)  # half way: cos(pi/2) = 0
    assert lr(s, 35) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr(s, 110) == pytest.approx(0.01)
    assert lr(s, 500) == pytest.approx(0.01)  # past the end: stays at the end value


def test_poly_as_mmsegmentation():
    # MMSeg's PolyLR: (base - eta_min) * (1 - iter / max_iters) ** power + eta_min, base 0.01, eta_min 1e-4
    s = WarmupDecaySchedule(0.01, "poly", total_steps=80000, power=0.9, final_ratio=0.01)
    for step in (0, 1000, 40000, 79999, 80000):
        expected = (0.01 - 1e-4) * (1 - step / 80000) ** 0.9 + 1e-4
        assert lr(s, step) == pytest.approx(expected, rel=1e-5)


def test_linear_to_zero():
    s = WarmupDecaySchedule(0.5, "linear", total_steps=200, warmup_steps=0)
    assert lr(s, 0) == pytest.approx(0.5)
    assert lr(s, 50) == pytest.approx(0.375)
    assert lr(s, 200) == pytest.approx(0.0)


def test_retarget_keeps_the_rate_continuous_and_ends_at_the_new_total():
    s = WarmupDecaySchedule(1.0, "linear", total_steps=100, warmup_steps=0)
    assert lr(s, 40) == pytest.approx(0.6)
    s.retarget(40, 160)  # the machine sped up: 120 more steps instead of 60
    assert lr(s, 40) == pytest.approx(0.6)
    assert lr(s, 100) == pytest.approx(0.3)  # half of the remaining 0.6 after 60 of 120 steps
    assert lr(s, 160) == pytest.approx(0.0)


def test_plateau_cut_scales_every_later_rate():
    s = WarmupDecaySchedule(0.1, "constant", total_steps=10)
    s.cut(0.5)
    s.cut(0.5)
    assert lr(s, 3) == pytest.approx(0.025)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_weight_decay_spares_biases_and_norm_parameters(name):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(5, 3, padding="same", bias_initializer="ones")(inputs)
    x = keras.layers.BatchNormalization(beta_initializer="ones")(x)
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    config = TrainConfig(optimizer=name, weight_decay=0.1, clipnorm=0.0)
    optimizer = build_optimizer(config, 0.5, model.trainable_variables)
    before = [v.numpy().copy() for v in model.trainable_variables]
    optimizer.apply([keras.ops.zeros_like(v) for v in model.trainable_variables], model.trainable_variables)
    for variable, old in zip(model.trainable_variables, before):
        new = variable.numpy()
        if variable.ndim <= 1:  # biases, BN gamma and beta
            np.testing.assert_array_equal(new, old, err_msg=variable.path)
        else:  # kernels shrink by lr * wd: x (1 - 0.05)
            np.testing.assert_allclose(new, old * 0.95, rtol=1e-6, err_msg=variable.path)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _planner(clock, **kwargs):
    """1,000 s to the deadline, validations' share 10% (100 s), a val split of 10 batches of 8."""
    values = dict(val_examples=80, examples_per_step=8, val_batches=10, clock=clock, margin=0.0)
    values.update(kwargs)
    return BudgetPlanner(1000.0, 1000.0, **values)


def test_training_time_is_what_the_final_phase_and_the_validations_leave():
    clock = FakeClock()
    planner = _planner(clock)
    planner.record_save(1.0)
    planner.record_probe([2.5, 0.5, 0.5])  # the first batch traces (2 s), a batch takes 0.5 s
    clock.now = 100.0
    planner.record_steps(10, 10.0)  # 1 s a step
    # final: validation 5 image by image (+ a 2 s trace) + 2 saves + export max(6 saves, 1.5 traces = 3)
    # + the report's drawing 1 + exit 0.3
    assert planner.trace_seconds == pytest.approx(2.0)
    assert planner.final_seconds() == pytest.approx(5 + 2 + 2 + 6 + 1 + 0.3)
    # a validation with its saves: 5 + 2; 100 s of share hold 14, the 9 wanted before the final one
    assert planner.validations_left() == 9
    assert planner.training_seconds_left() == pytest.approx(1000 - 100 - 16.3 - 9 * 7)
    assert planner.planned_steps(10) == 10 + int((1000 - 100 - 16.3 - 9 * 7) // 1.0)
    # the share spent: fewer validations fit
    planner.record_validation(5.0, saves_seconds=2.0)
    planner.record_validation(40.0, saves_seconds=2.0)  # one 8x slower: the median of a batch holds
    assert planner.full_validation_seconds() == pytest.approx(5.0)
    assert planner.validations_left() == (100 - 49) // 7  # 7, under the 7 still wanted


def test_the_final_phase_sizes_the_export_by_the_probed_trace_and_adds_the_report():
    """The export costs 1.5 traces of the evaluation step once the probe measured one, 4 s before;
    six saves where they take longer; the final validation a trace more; the report 1 s of drawing."""
    clock = FakeClock()
    planner = _planner(clock)
    planner.record_save(0.1)
    planner.record_steps(1, 0.3)  # before the probe: a validation is guessed at a third of the steps it holds
    guess = 10 * 0.3 / 3
    assert planner.final_seconds() == pytest.approx(guess + 0.2 + 4 + 1 + 0.3)
    planner.record_probe([2.2, 0.05, 0.05])  # a 2.15 s trace: the export 3.225 s
    assert planner.final_seconds() == pytest.approx(0.5 + 2.15 + 0.2 + 1.5 * 2.15 + 1 + 0.3)
    planner.record_save(1.0)  # six saves outweigh the trace
    assert planner.final_seconds() == pytest.approx(0.5 + 2.15 + 2 + 6 + 1 + 0.3)


def test_progress_follows_training_time_and_a_slow_chunk_bends_it_without_a_jump():
    """Steady chunks: progress is the training time spent over the training time left at the start.
    A chunk twice as slow as planned leaves the progress where its steps took it (no jump), and the
    rest of the decay is spread over the time then left, ending when it does."""
    clock = FakeClock()
    planner = _planner(clock, export=False, report=False, validation_share=0.0)
    planner.record_save(0.0)
    planner.record_probe([0.0, 0.0])  # validations cost nothing: every second left is training time
    clock.now = 10.0
    planner.record_steps(10, 10.0)  # measured: 1 s a step; the first measured chunk's steps decay nothing
    left = planner.training_seconds_left()
    assert left == pytest.approx(1000 - 10 - 0.3)  # the exit
    start, per_step, cap = planner.segment(10, 10)
    assert (start, per_step, cap) == (0.0, pytest.approx(1 / left), pytest.approx(10 / left))
    clock.now += 10.0
    planner.record_steps(10, 10.0)
    assert planner.progress == pytest.approx(10 / left)
    start, per_step, cap = planner.segment(10, 10)
    assert start == pytest.approx(10 / left) and per_step == pytest.approx((1 - start) / (left - 10))
    clock.now += 20.0  # twice as slow: the steps were given 10 steps' worth, and that is where it stays
    planner.record_steps(10, 20.0)
    assert planner.progress == pytest.approx(cap)
    start, per_step, _ = planner.segment(10, 10)
    remaining = left - 30
    assert per_step == pytest.approx((1 - cap) * planner.seconds_per_step / remaining)
    # the last chunk: the one that uses up the time left ends the decay at its last step
    clock.now = 1000 - 0.3 - 5.0
    start, per_step, cap = planner.segment(5, 5)
    assert cap == pytest.approx(1.0) and start + 5 * per_step == pytest.approx(1.0)


def test_a_val_split_too_slow_for_the_share_is_validated_in_part():
    """10 batches of 30 s: 300 s a validation, over the 100 s share: the first 3 batches (90 s)."""
    clock = FakeClock()
    planner = _planner(clock)
    planner.record_probe([40.0, 30.0, 30.0])
    planner.record_save(0.0)
    assert planner.choose_val_batches() == 3
    assert planner.validation_estimate() == pytest.approx(90.0)
    planner.record_validation(90.0)
    assert planner.choose_val_batches() == 3  # a fixed part: the same batches every time
    planner.record_save(6.0)  # a validation's two saves take 12 s of the share: 2 batches fit
    assert planner.choose_val_batches() == 2


def test_a_warmup_longer_than_the_planned_run_is_capped_at_half_of_it():
    """Item 7: warm-up 100 steps, a budget that fits 40. retarget alone clamped the decay behind the
    warm-up, so step 40 still ramped (0.01 + 0.99 x 0.4 = 0.406 of the base). Capped at 20: the ramp
    reaches the base at step 20 and the cosine ends at its end value at step 40."""
    s = WarmupDecaySchedule(1.0, "cosine", total_steps=10**9, warmup_steps=100, warmup_start=0.01)
    assert s.cap_warmup(5, 40) == 20
    s.retarget(5, 40)
    assert lr(s, 10) == pytest.approx(0.01 + 0.99 * 10 / 20)
    assert lr(s, 20) == pytest.approx(1.0)
    assert lr(s, 30) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr(s, 40) == pytest.approx(0.01)
    assert s.cap_warmup(25, 1000) is None  # a longer plan never lengthens it again
    assert s.warmup_steps == 20


@pytest.mark.slow  # 19 s on CPU-E (a trainer run); the planner's cap stays above
def test_a_budget_run_shorter_than_its_warmup_ends_at_the_schedules_end_value(tiny_data, tmp_path):  # noqa: F811
    """A 20-second budget and a 100,000-step warm-up: the run logs the cap and its last step's rate is
    the linear schedule's end value, 0 (it ended still rising before)."""
    import time

    from keras_seg.training.trainer import Trainer
    from test_train import make_config

    lines = []
    config = make_config(tiny_data, tmp_path / "run", "--time-budget", str(20 / 60), "--warmup-iters", "100000",
                         "--schedule", "linear", "--no-export")
    trainer = Trainer(config, log=lines.append, started_at=time.time())
    trainer.run()
    assert any(line.startswith("time budget: warm-up of 100000 steps shortened to") for line in lines), lines
    step = int(trainer.step.numpy())
    # half of the plan, or the step reached when a slow-down shrank the plan late (17 of 19 under
    # load): before the last step either way
    assert step > 10 and trainer.schedule.warmup_steps < step
    assert float(trainer.schedule(step)) == pytest.approx(0.0, abs=1e-9)
    assert float(read_history(tmp_path / "run")[-1]["learning_rate"]) == pytest.approx(0.0, abs=1e-9)
