"""The time-budget planner under a fake clock: the real loop, planner and schedule, scripted step,
validation and save times (tests/planner_harness.py). For each scenario: the run ends within 2% of
its budget; the rate never falls much faster than a straight line in training time (the planner
once took it from 1.99e-3 to its end value, 2e-5, in one step: 660 times a straight line's fall),
is still above 5% of the base at 90% of the training time and reaches its end value at the last
step; no two validations are closer than half their even spacing; the validations during the run
take at most their share of the budget."""

import numpy as np
import pytest

from planner_harness import SCENARIOS, describe, simulate, worst_drop_ratio


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_a_budget_run_under_a_fake_clock(scenario):
    outcome = simulate(scenario)
    summary = describe(outcome)
    assert abs(outcome.end / outcome.budget - 1) <= 0.02, summary
    assert outcome.steps > outcome.warmup_steps, summary
    # No cliff: the largest one-step fall within 4x a straight line's (noise +-40% and a 3x slow-down
    # bend it, measured by each step's own time).
    assert worst_drop_ratio(outcome) <= 4.0, summary
    training_end = outcome.training_times[-1] + outcome.step_durations[-1]
    late = np.searchsorted(outcome.training_times, 0.9 * training_end)
    assert outcome.rates[late - 1] > 0.05 * scenario.learning_rate, summary
    assert outcome.end_rate == pytest.approx(0.0, abs=1e-12), summary
    times = [v[1] for v in outcome.validations] + [training_end]
    if outcome.validations:
        spacing = training_end / len(times)
        assert min(np.diff([0.0] + times)) >= 0.5 * spacing, summary
    assert sum(v[2] for v in outcome.validations) <= scenario.validation_share * outcome.budget, summary


def test_the_harness_sees_a_cliff():
    """The check above fails on a schedule that jumps to its end: the harness can fail."""
    outcome = simulate(SCENARIOS[0])
    rates = outcome.rates.copy()
    rates[len(rates) // 2:] = 0.0
    outcome.rates = rates
    assert worst_drop_ratio(outcome) > 100
