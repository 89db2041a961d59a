"""Learning-rate schedules against hand-computed values, weight-decay exclusion, the time-budget planner."""

import math

import keras
import numpy as np
import pytest

from keras_seg.budget import TimeBudget
from keras_seg.config import TrainConfig
from keras_seg.schedules import WarmupDecaySchedule
from keras_seg.trainer import build_optimizer
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


def test_budget_plan_fills_the_time_left_and_follows_a_slowdown():
    clock = FakeClock()
    budget = TimeBudget(deadline=1000.0, clock=clock, margin=0.0, window=45.0)
    budget.record_save(1.0)
    budget.record_validation(5.0)
    clock.now = 100.0
    budget.record_steps(10, 10.0)  # 1 s a step
    # 900 s left - final (5 s validation + 2 saves + export max(4, 6 x 1 s) + 0.3 s exit) - 3 validations
    # x 5 s = 871.7: 871 whole steps of 1 s
    assert budget.final_seconds(0.0) == pytest.approx(5 + 2 + 6 + 0.3)
    assert budget.plan(step=10, validations_left=3) == 10 + 871
    clock.now = 200.0 + 3 * 45  # long after: the window holds only the recent, slower chunks
    for _ in range(3):
        budget.record_steps(10, 20.0)
    assert budget.seconds_per_step == pytest.approx(2.0)
    left = 1000.0 - clock.now - 13.3 - 3 * 5
    assert budget.plan(step=40, validations_left=3) == 40 + int(left // 2)


def test_budget_final_phase_sizes_the_export_by_the_measured_trace_and_adds_the_report():
    """The export costs 1.5 traces of the evaluation step (the first validation over a later one)
    once both are measured, 4 s before; the report a validation and 1 s of drawing."""
    budget = TimeBudget(deadline=1000.0, clock=FakeClock(), report=True)
    budget.record_save(0.1)
    budget.record_first_validation(2.5)
    # the first validation is no measure of the others: the caller's estimate (0.7 s) stands for
    # them; + 2 saves + export 4 s + report (0.7 + 1) + exit 0.3
    assert budget.final_seconds(0.7) == pytest.approx(0.7 + 0.2 + 4 + 1.7 + 0.3)
    budget.record_validation(0.5)  # the trace took 2 s: the export 3 s
    assert budget.final_seconds(0.0) == pytest.approx(0.5 + 0.2 + 3 + 1.5 + 0.3)
    budget.record_save(1.0)  # six saves outweigh the trace
    assert budget.final_seconds(0.0) == pytest.approx(0.5 + 2 + 6 + 1.5 + 0.3)


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

    from keras_seg.trainer import Trainer
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
