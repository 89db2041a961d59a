"""A fake clock that drives the real training loop (`loop.run_loop`), planner (`cadence.BudgetPlanner`)
and schedule (`schedules.WarmupDecaySchedule`) with scripted step, validation and save times.

Nothing trains: `FakeRun`'s hooks only move the clock, and record the learning rate the real
schedule gives each step. `simulate` runs start-up, the loop and the final phase (a validation, two
saves, the export, the report's scoring and drawing, the exit) as the trainer does, and returns what
happened: `python tests/planner_harness.py` prints the scenarios of tests/test_budget_planner.py.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np

from keras_seg.training import cadence, loop
from keras_seg.training.schedules import WarmupDecaySchedule


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@dataclasses.dataclass
class Scenario:
    name: str
    budget_minutes: float = 18.0
    step_seconds: float = 1.2
    noise: float = 0.05  # each step's time varies by up to this share, uniformly
    slowdown: tuple = None  # (from, to, factor): steps between these shares of the budget take factor x
    validation_seconds: float = 20.0  # a validation of the whole val split
    validation_spikes: tuple = ()  # (validation index, factor)
    trace_seconds: float = 5.0  # the first validation's extra
    save_seconds: float = 0.5
    # The export re-traces the model into the SavedModel's signatures: 1.66x the evaluation step's trace in
    # a demo run (7.75 s after a 4.67 s trace); the planner reserves 1.5x (cadence.EXPORT_TRACES).
    export_traces: float = 1.66
    start_up_seconds: float = 35.0
    val_examples: int = 298
    val_batch_size: int = 8
    examples_per_step: int = 8
    steps_per_call: int = 10
    warmup_steps: int = 167
    validation_share: float = cadence.VALIDATION_SHARE
    learning_rate: float = 2e-3
    seed: int = 0
    progressive: tuple = None  # (share, factor): steps take factor x as long once the progress reaches share


@dataclasses.dataclass
class Outcome:
    scenario: Scenario
    steps: int
    end: float  # seconds after the start when the process would exit
    budget: float
    training_times: np.ndarray  # training seconds at the start of each step
    rates: np.ndarray  # the learning rate of each step
    step_durations: np.ndarray
    validations: list  # (step, training seconds, seconds with saves, batches) during the run
    final_batches: object
    warmup_steps: int
    end_rate: float  # the schedule's rate after the last step (history.csv's last row)


class FakeRun(loop.Hooks):
    """The loop's hooks, on a fake clock."""

    def __init__(self, scenario: Scenario, clock: Clock, schedule: WarmupDecaySchedule):
        self.s, self.clock, self.schedule = scenario, clock, schedule
        self.rng = random.Random(scenario.seed)
        self.training = 0.0
        self.times, self.rates, self.durations, self.validations = [], [], [], []
        self.step = 0
        self.switched = False
        self.validation_index = 0
        self.budget = 60 * scenario.budget_minutes
        self.val_batches_full = -(-scenario.val_examples // scenario.val_batch_size)

    @property
    def warmup_steps(self):
        return self.schedule.warmup_steps

    def step_seconds(self):
        s = self.s
        seconds = s.step_seconds * (1 + self.rng.uniform(-s.noise, s.noise))
        if s.slowdown and s.slowdown[0] * self.budget <= self.clock.now < s.slowdown[1] * self.budget:
            seconds *= s.slowdown[2]
        if self.switched:
            seconds *= s.progressive[1]
        return seconds

    def change_input(self, step):
        share = self.s.progressive[0] if self.s.progressive else None
        if share is None or self.switched or float(self.schedule.progress(step)) < share:
            return False
        self.switched = True
        return True

    def train(self, steps):
        rates = self.schedule(np.arange(self.step, self.step + steps)).numpy()
        for rate in rates:
            seconds = self.step_seconds()
            self.times.append(self.training)
            self.rates.append(float(rate))
            self.durations.append(seconds)
            self.training += seconds
            self.clock.now += seconds
        self.step += steps
        return 1.0

    def set_segment(self, step, progress, per_step, cap):
        self.schedule.set_segment(step, progress, per_step, cap)

    def cap_warmup(self, step, planned_steps):
        self.schedule.cap_warmup(step, planned_steps)

    def validation_seconds(self, batches):
        s = self.s
        seconds = s.validation_seconds * (batches or self.val_batches_full) / self.val_batches_full
        for index, factor in s.validation_spikes:
            if index == self.validation_index:
                seconds *= factor
        return seconds

    def probe_validation(self, batches):
        per_batch = self.s.validation_seconds / self.val_batches_full
        times = [self.s.trace_seconds + per_batch] + [per_batch] * (batches - 1)
        self.clock.now += sum(times)
        return times

    def validate(self, step, final, batches):
        started = self.clock.now
        # The final one scores image by image through a function of its own: a trace more.
        self.clock.now += self.validation_seconds(batches) + (self.s.trace_seconds if final else 0.0)
        self.validation_index += 1
        self._current = [step, self.training, self.clock.now - started, batches, final]
        self.validations.append(self._current)
        return True  # every validation improves: the best model is saved each time (the costlier case)

    def save_best(self, step):
        self.clock.now += self.s.save_seconds
        self._current[2] += self.s.save_seconds

    def checkpoint(self, step):
        self.clock.now += self.s.save_seconds
        if self.validations and self.validations[-1][0] == step:
            self.validations[-1][2] += self.s.save_seconds


def simulate(scenario: Scenario) -> Outcome:
    clock = Clock()
    budget = 60 * scenario.budget_minutes
    schedule = WarmupDecaySchedule(scenario.learning_rate, "linear", total_steps=2**40,
                                   warmup_steps=scenario.warmup_steps)
    run = FakeRun(scenario, clock, schedule)
    clock.now = scenario.start_up_seconds
    planner = cadence.BudgetPlanner(
        budget, budget, val_examples=scenario.val_examples, examples_per_step=scenario.examples_per_step,
        val_batches=run.val_batches_full, clock=clock, margin=0.01 * budget, export=True, report=True,
        validation_share=scenario.validation_share)
    result = loop.run_loop(run, 0, scenario.steps_per_call, planner=planner, timing=loop.new_timing(0.0),
                           clock=clock)
    # The final phase as the trainer's: the last model saved, the best loaded and drawn, the export,
    # the report (drawn from the final validation's image scores: every validation improves here), the exit.
    final_batches = planner.val_batches
    clock.now += scenario.save_seconds * 2 + scenario.export_traces * scenario.trace_seconds
    clock.now += cadence.REPORT_DRAW_SECONDS + cadence.EXIT_SECONDS
    during = [(v[0], v[1], v[2], v[3]) for v in run.validations if not v[4]]
    return Outcome(scenario, result.step, clock.now, budget, np.array(run.times), np.array(run.rates),
                   np.array(run.durations), during, final_batches, schedule.warmup_steps,
                   float(schedule(result.step)))


def worst_drop_ratio(outcome: Outcome) -> float:
    """The largest one-step fall of the rate, over what a straight line in training time from the end of
    the warm-up to the end of the run would fall in that step's time (1: as planned; a cliff: >> 1)."""
    start = outcome.warmup_steps
    times, rates, durations = outcome.training_times[start:], outcome.rates[start:], outcome.step_durations[start:]
    if len(rates) < 2:
        return 0.0
    span = times[-1] + durations[-1] - times[0]
    planned = rates[0] * durations[:-1] / span
    return float(np.max((rates[:-1] - rates[1:]) / planned))


def describe(outcome: Outcome) -> str:
    s = outcome.scenario
    spacing = np.diff([v[1] for v in outcome.validations]) if len(outcome.validations) > 1 else []
    validation_total = sum(v[2] for v in outcome.validations)
    return (f"{s.name}: {outcome.steps} steps, ends at {outcome.end:.0f} s of {outcome.budget:.0f} "
            f"({100 * (outcome.end / outcome.budget - 1):+.1f}%), {len(outcome.validations)} validations during the "
            f"run taking {validation_total:.0f} s ({100 * validation_total / outcome.budget:.1f}% of the budget) at "
            f"steps {[v[0] for v in outcome.validations]}, spaced {[round(x) for x in spacing]} s of training; "
            f"validation batches {outcome.final_batches or 'all'}; worst one-step fall of the rate "
            f"{worst_drop_ratio(outcome):.2f}x a straight line's")


SCENARIOS = [
    Scenario("steady, 1.2 s a step +-5%"),
    Scenario("noise +-40%", noise=0.4),
    Scenario("3x slower for a fifth of the run", slowdown=(0.4, 0.6, 3.0)),
    Scenario("validation spikes (3x, 5x)", validation_spikes=((2, 3.0), (5, 5.0))),
    Scenario("progressive: 0.3 s steps, 4x after 70% of the decay", step_seconds=0.3, progressive=(0.7, 4.0)),
    Scenario("a machine 10x slower", step_seconds=12.0, validation_seconds=200.0, trace_seconds=50.0,
             start_up_seconds=120.0, save_seconds=5.0, warmup_steps=167),
    Scenario("a budget shorter than one validation", budget_minutes=1.0, step_seconds=0.5,
             validation_seconds=90.0, trace_seconds=2.0, start_up_seconds=10.0, warmup_steps=30),
    Scenario("the default command on a slow CPU (6 min)", budget_minutes=6.0, step_seconds=1.4, noise=0.3,
             validation_seconds=6.0, trace_seconds=3.0, start_up_seconds=40.0, val_examples=120,
             examples_per_step=16, warmup_steps=30, save_seconds=0.3, validation_share=0.05),
]


def markdown_row(outcome: Outcome) -> str:
    s = outcome.scenario
    spent = sum(v[2] for v in outcome.validations)
    setting = f"{s.budget_minutes:g} min, {s.step_seconds:g} s a step, validation {s.validation_seconds:g} s"
    end = 100 * (outcome.end / outcome.budget - 1)
    return (f"| {s.name} | {setting} | {outcome.steps} | {end:+.1f}% | {len(outcome.validations)} "
            f"({100 * spent / outcome.budget:.1f}%) | {outcome.final_batches or 'all'} "
            f"| {worst_drop_ratio(outcome):.2f}x |")


if __name__ == "__main__":
    import sys

    if "--markdown" in sys.argv:
        print("| scenario | budget, step, whole validation | steps | end vs budget | validations during the run "
              "(share of the budget) | val batches | worst one-step fall of the rate / a straight line's |")
        print("|---|---|---|---|---|---|---|")
    for scenario in SCENARIOS:
        outcome = simulate(scenario)
        print(markdown_row(outcome) if "--markdown" in sys.argv else describe(outcome))
