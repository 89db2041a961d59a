"""Sizing a run to a time budget: how many steps fit between now and the deadline.

The budget counts from the process's start (TensorFlow's import and the model's compilation are
part of what a user waits for) to its exit, so it must leave room for what comes after the last
step: the final validation, saving the models and the SavedModel export. The planner measures
everything it can (the step time over the recent past, each validation, each model save) and
re-plans as it goes, so a machine that slows down or speeds up moves the end of the run, and the
schedule is re-fitted to it (`WarmupDecaySchedule.retarget`).
"""

from __future__ import annotations

import collections
import os
import time

# The export traces the model into a SavedModel: it costs several model saves, or about as long as
# tracing the evaluation step, which the first validation measures (its time over a later one's).
# In a tiny 2-minute run on CPU-D the export took 1.5 s after a 1.55 s trace; EXPORT_TRACES leaves
# room for the contract's window loop in bigger models. Before any validation: 4 s (the smallest
# models' export on CPU-B, 3.5-4 s).
EXPORT_SAVES, EXPORT_TRACES = 6.0, 1.5
MIN_EXPORT_SECONDS = 4.0
# After the last line: the process's end. The command ends with os._exit (keras_seg.train), which
# took 0.1 s in CI on CPU-D (the last line at 113.92 s, the exit at 114.0); it was 1-2 s on CPU-B
# when the interpreter and TensorFlow shut down in full.
EXIT_SECONDS = 0.3
# The run report scores the val split once more (a validation's time) and draws its charts (0.5 s
# for a tiny run on CPU-D; it was 4 s here until a 2-minute CI run ended 9 s early).
REPORT_DRAW_SECONDS = 1.0
# Step time is the mean over the chunks of the recent past: 3% of the budget (at least 3 s, at
# most a minute), long enough to smooth noise, short enough that a slow-down late in the run is
# followed before the end (a 1-minute budget looks at the last 3 s, a 35-minute one at the last minute).
WINDOW_FRACTION, MIN_WINDOW_SECONDS, MAX_WINDOW_SECONDS = 0.03, 3.0, 60.0


def process_start_time() -> float:
    """When this process started (wall clock), from /proc; the import time of this module elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + int(fields[19]) / ticks
    except (OSError, ValueError, IndexError):
        return _IMPORTED_AT


_IMPORTED_AT = time.time()


def window_seconds(budget_seconds) -> float:
    return min(MAX_WINDOW_SECONDS, max(MIN_WINDOW_SECONDS, WINDOW_FRACTION * budget_seconds))


class TimeBudget:
    """Plans the total step count of a run that must end by `deadline` (a `clock()` time).

    Args:
        deadline: when the process must have exited, in `clock()` seconds.
        clock: the time source (tests pass a fake one).
        margin: seconds kept free for what cannot be measured in advance (the trainer: 2% of the
            budget, so that a run aims to end at 98% of it).
        export: whether the run ends with a SavedModel export.
        report: whether the run ends with its report (`keras_seg.report`).
        window: seconds of recent chunks whose mean step time is the estimate.
    """

    def __init__(self, deadline, clock=time.time, margin=0.0, export=True, window=MAX_WINDOW_SECONDS, report=False):
        self.deadline = deadline
        self.export = export
        self.report = report
        self.window = window
        self.clock = clock
        self.margin = margin
        self._chunks = collections.deque()  # (end time, steps, seconds)
        self.validation_seconds = None
        self.first_validation_seconds = None
        self.save_seconds = None

    def record_steps(self, steps, seconds):
        now = self.clock()
        self._chunks.append((now, steps, seconds))
        while len(self._chunks) > 2 and now - self._chunks[0][0] > self.window:
            self._chunks.popleft()

    def record_validation(self, seconds):
        self.validation_seconds = seconds

    def record_first_validation(self, seconds):
        """The first validation also traces the evaluation step: not a measure of the others."""
        self.first_validation_seconds = seconds

    @property
    def trace_seconds(self):
        """How long tracing the evaluation step took, once a later validation is measured; else None."""
        if self.first_validation_seconds is None or self.validation_seconds is None:
            return None
        return max(0.0, self.first_validation_seconds - self.validation_seconds)

    def record_save(self, seconds):
        self.save_seconds = seconds if self.save_seconds is None else max(self.save_seconds, seconds)

    @property
    def measured(self) -> bool:
        return bool(self._chunks)

    @property
    def seconds_per_step(self) -> float:
        steps = sum(c[1] for c in self._chunks)
        return sum(c[2] for c in self._chunks) / max(steps, 1)

    def final_seconds(self, validation_estimate) -> float:
        """What follows the last step: a validation, the last model, the export, the report and the process's exit."""
        save = self.save_seconds or 1.0
        validation = self.validation_seconds if self.validation_seconds is not None else validation_estimate
        trace = self.trace_seconds
        export = max(EXPORT_SAVES * save, MIN_EXPORT_SECONDS if trace is None else EXPORT_TRACES * trace)
        export = export if self.export else 0.0
        report = validation + REPORT_DRAW_SECONDS if self.report else 0.0
        return validation + 2 * save + export + report + EXIT_SECONDS

    def plan(self, step, validations_left, validation_estimate=0.0) -> int:
        """The total step count that ends the run on time, given `validations_left` validations
        before the final one (each as long as the last measured, else `validation_estimate`)."""
        validation = self.validation_seconds if self.validation_seconds is not None else validation_estimate
        left = self.deadline - self.clock()
        left -= self.margin + self.final_seconds(validation_estimate) + validations_left * validation
        return int(step + max(0, left) // max(self.seconds_per_step, 1e-6))
