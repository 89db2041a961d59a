"""When a run validates and checkpoints, and how long a time-budget run trains: plain Python, no TensorFlow.

Fixed-length runs (`--iters`, `--epochs`) count in steps: `StepCadence` places validations every
epoch, every `--val-every` steps, or ten times a run, and checkpoints with them (or every
`--checkpoint-every` steps).

A time-budget run counts in seconds (`BudgetPlanner`). Its budget runs from the process's start to
its exit; the planner keeps the rest of it apart for what must come after the last step (the final
validation, the models, the export, the report: `final_seconds`), for the validations still to come
and for a margin, and what remains is training time. From that:

- the schedule's progress (`progress`, 0 to 1 over the decay, after the warm-up) follows the training
  time: before each chunk, what is left of the decay is spread over the training time left, and each
  step of the chunk gets its share at the present step time (`segment`). It never goes back, never
  jumps, and reaches 1 only when no training time is left: a noisy step changes how many steps are
  made, not the rate; a slow validation leaves less time, and the rest of the decay is spread over
  what is left (a steeper slope, not a jump).
- validations are spaced evenly in training time over what is left, and their count is held so that
  their total (the evaluation and the saves that come with it) stays within `validation_share` of the
  budget: on a slow machine, fewer of them. Before the first, a probe runs the first val batches once
  (`record_probe`): the first traces the evaluation step, the others time a batch. Each validation is
  timed without the saves that follow it (which depend on whether the score improved); the estimate
  is the median of the seconds a batch measured, the probe's included. When one validation of the
  whole val split would take more than that share, the run validates on its first batches, as many
  as fit (`val_batches`), the final validation and the report's scoring too.
- the run stops training when its training time is used up (`chunk_steps` returns 0), and a chunk
  never commits to more than the planner's window, the time to the next validation or the time left.
"""

from __future__ import annotations

import collections
import math
import os
import statistics
import time

# Validations in a run sized by --iters, or the most in a --time-budget run, when --val-every is not given.
DEFAULT_VALIDATIONS = 10
# The share of a time budget that validations during the run (the final one apart) may take, by default.
VALIDATION_SHARE = 0.10

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
# The final validation scores the split image by image, as `evaluate` does, through a function of its
# own (one more trace of the evaluation), and the run report takes those scores (it scores best.keras
# itself only where the final model is not the best); it draws its charts in about a second (0.5 s for
# a tiny run on CPU-D).
REPORT_DRAW_SECONDS = 1.0
# Step time is the mean over the chunks of the recent past: 3% of the budget (at least 3 s, at most
# a minute), long enough to smooth noise, short enough that a slow-down late in the run is followed
# before the end. It is also the most a chunk of steps commits to.
WINDOW_FRACTION, MIN_WINDOW_SECONDS, MAX_WINDOW_SECONDS = 0.03, 3.0, 60.0
# Before the first validation is measured: the val split's forward passes at a third of a training step's cost.
FORWARD_SHARE = 1 / 3


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


class StepCadence:
    """Validation and checkpoint points of a run counted in steps.

    Args:
        total_steps: the run's length.
        val_every: validate every this many steps (0: every `steps_per_epoch` with `per_epoch`, else
            DEFAULT_VALIDATIONS times a run, evenly).
        checkpoint_every: checkpoint every this many steps (0: with every validation).
    """

    def __init__(self, total_steps, val_every=0, checkpoint_every=0, steps_per_epoch=1, per_epoch=False):
        self.total_steps = total_steps
        self.interval = val_every or (steps_per_epoch if per_epoch else 0)
        self.checkpoint_every = checkpoint_every

    def next_validation(self, step) -> int:
        """The step of the first validation after `step` (the end of the run validates too)."""
        if self.interval:
            return (step // self.interval + 1) * self.interval
        # DEFAULT_VALIDATIONS evenly spread: the k-th at ceil(k * total / DEFAULT_VALIDATIONS).
        total = max(self.total_steps, 1)
        k = step * DEFAULT_VALIDATIONS // total + 1
        return math.ceil(k * total / DEFAULT_VALIDATIONS)

    def next_checkpoint(self, step) -> int:
        every = self.checkpoint_every
        return (step // every + 1) * every if every else self.next_validation(step)


class BudgetPlanner:
    """Plans a run that must end by `deadline` (a `clock()` time); see the module docstring.

    Args:
        deadline: when the process must have exited, in `clock()` seconds.
        budget_seconds: the whole budget (the validations' share and the window are of it).
        val_examples, examples_per_step, val_batches: the val split's size, a step's examples and the
            val split's batches (for the estimate before any validation, and for a part of the split).
        clock: the time source (the tests' harness passes a fake one).
        margin: seconds kept free for what cannot be measured in advance (the trainer: 1% of the budget).
        export, report: whether the run ends with a SavedModel export and with its report.
        validation_share: the most the validations during the run may take, as a share of the budget.
        validations: the most validations during the run, the final one included.
        val_every: validations every this many steps instead of spaced in time (--val-every).
        progress: the schedule's progress already reached (a resumed run).
    """

    def __init__(self, deadline, budget_seconds, *, val_examples, examples_per_step, val_batches, clock=time.time,
                 margin=0.0, export=True, report=True, validation_share=VALIDATION_SHARE,
                 validations=DEFAULT_VALIDATIONS, val_every=0, progress=0.0):
        self.deadline, self.budget_seconds, self.clock, self.margin = deadline, budget_seconds, clock, margin
        self.export, self.report = export, report
        self.val_examples, self.examples_per_step, self.val_batches_full = val_examples, examples_per_step, val_batches
        self.validation_cap = validation_share * budget_seconds
        self.validations_wanted = max(0, validations - 1)  # during the run; the final one apart
        self.val_every = val_every
        self.window = window_seconds(budget_seconds)
        self._chunks = collections.deque()  # (end time, steps, seconds) of the recent past
        self.batch_seconds = []  # seconds a val batch: the probe's, then each validation's
        self.trace_seconds = None  # tracing the evaluation step, from the probe
        self.save_seconds = None  # the longest model or checkpoint save
        self.validations_done = 0
        self.validation_spent = 0.0  # seconds, saves included, of the validations during the run
        self.training_spent = 0.0  # seconds of measured training chunks
        self.last_validation_at = 0.0  # training seconds at the last validation
        self.progress = float(progress)
        self.val_batches = None  # None: the whole split; else its first N batches (decided once)
        self._segment = None

    # ------------------------------------------------------------------ measurements

    def record_steps(self, steps, seconds):
        """A measured chunk of training steps (not the first, which compiles). The progress becomes
        what the chunk's steps were given (`segment`): a chunk slower or faster than planned leaves the
        rest of the decay to be spread over the time then left, with no jump."""
        if self._segment is not None:
            self.progress = self._segment
            self._segment = None
        self.training_spent += seconds
        now = self.clock()
        self._chunks.append((now, steps, seconds))
        while len(self._chunks) > 2 and now - self._chunks[0][0] > self.window:
            self._chunks.popleft()

    def forget_step_time(self):
        """The step changed (a new input size): its time is measured anew."""
        self._chunks.clear()
        self._segment = None

    def record_probe(self, batch_seconds):
        """The first val batches run once before the first validation: the first traces the evaluation
        step (its time over the others' is the trace), the others time a batch."""
        rest = batch_seconds[1:] or batch_seconds
        per_batch = statistics.median(rest)
        self.trace_seconds = max(0.0, batch_seconds[0] - per_batch)
        self.batch_seconds.append(per_batch)

    def record_validation(self, seconds, saves_seconds=0.0, final=False):
        """A validation's time (without its saves) and the time of the saves after it."""
        self.batch_seconds.append(seconds / (self.val_batches or self.val_batches_full))
        if not final:
            self.validations_done += 1
            self.validation_spent += seconds + saves_seconds
            self.last_validation_at = self.training_spent

    def record_save(self, seconds):
        self.save_seconds = seconds if self.save_seconds is None else max(self.save_seconds, seconds)

    # ------------------------------------------------------------------ estimates

    @property
    def measured(self) -> bool:
        return bool(self._chunks)

    @property
    def seconds_per_step(self) -> float:
        steps = sum(c[1] for c in self._chunks)
        return sum(c[2] for c in self._chunks) / max(steps, 1)

    def full_validation_seconds(self) -> float:
        """One validation of the whole val split: the median of the measured seconds a batch (the
        probe's among them, so that one slow validation does not move it), else a guess from the step."""
        if self.batch_seconds:
            return statistics.median(self.batch_seconds) * self.val_batches_full
        return self.val_examples / self.examples_per_step * self.seconds_per_step * FORWARD_SHARE

    def validation_estimate(self) -> float:
        """One validation as this run does them (the whole split or its first batches)."""
        return self.full_validation_seconds() * (self.val_batches or self.val_batches_full) / self.val_batches_full

    def final_seconds(self) -> float:
        """What follows the last step: the final validation (image by image: a trace more), the last model,
        the export, the report's drawing and the exit."""
        save = 1.0 if self.save_seconds is None else self.save_seconds
        trace = self.trace_seconds
        validation = self.validation_estimate() + (trace or 0.0)
        export = max(EXPORT_SAVES * save, MIN_EXPORT_SECONDS if trace is None else EXPORT_TRACES * trace)
        export = export if self.export else 0.0
        report = REPORT_DRAW_SECONDS if self.report else 0.0
        return validation + 2 * save + export + report + EXIT_SECONDS

    def event_seconds(self) -> float:
        """A validation during the run with its saves (the checkpoint, and the best model if it improved)."""
        return self.validation_estimate() + 2 * (self.save_seconds or 0.0)

    def validations_left(self) -> int:
        """Validations still to come before the final one, as many as the share of the budget allows."""
        if self.val_every:
            steps_left = self.training_seconds_left(validations=0) / max(self.seconds_per_step, 1e-9)
            return max(0, int(steps_left // self.val_every))
        wanted = self.validations_wanted - self.validations_done
        room = self.validation_cap - self.validation_spent
        return max(0, min(wanted, int(room // max(self.event_seconds(), 1e-9))))

    def training_seconds_left(self, validations=None) -> float:
        """Training time left now: to the deadline, less the margin, the final phase and the
        validations still to come."""
        now = self.clock()
        if validations is None:
            validations = self.validations_left()
        left = self.deadline - now - self.margin - self.final_seconds() - validations * self.event_seconds()
        return max(0.0, left)

    # ------------------------------------------------------------------ decisions

    def choose_val_batches(self):
        """The whole val split, or, where one validation of it would take more than the validations'
        share of the budget, its first batches, as many as fit in that share (at least one).
        Returns the count, or None (all)."""
        full = self.full_validation_seconds()
        room = self.validation_cap - 2 * (self.save_seconds or 0.0)  # a validation's saves come with it
        if full > room:
            self.val_batches = max(1, min(self.val_batches or self.val_batches_full,
                                          int(self.val_batches_full * room / full)))
        return self.val_batches

    def validation_due(self, step) -> bool:
        """Whether a validation is due now (after a chunk that ended at `step`)."""
        if self.val_every:
            return step % self.val_every == 0
        return self.validations_left() > 0 and self.training_spent >= self.next_validation_at() - 1e-9

    def next_validation_at(self) -> float:
        """Training seconds at which the next validation falls: the validations left spread evenly over
        the training time left since the last one."""
        left = self.validations_left()
        if left <= 0:
            return math.inf
        since = self.training_spent - self.last_validation_at
        span = since + self.training_seconds_left()
        return self.last_validation_at + span / (left + 1)

    def chunk_steps(self, step, most) -> int:
        """Steps for the next call (at most `most`): 0 when the training time is used up; two until
        the step time is measured."""
        if not self.measured:
            return min(2, most)
        per_step = max(self.seconds_per_step, 1e-9)
        left = self.training_seconds_left()
        if left < 0.5 * per_step:
            return 0
        seconds = min(self.window, left)
        if self.val_every:
            fit = int(seconds // per_step)
            to_validation = self.val_every - step % self.val_every
            return max(1, min(most, fit, to_validation))
        to_validation = self.next_validation_at() - self.training_spent
        if to_validation > 0:
            seconds = min(seconds, to_validation)
        return max(1, min(most, int(round(seconds / per_step))))

    def segment(self, steps, decay_steps):
        """Before a chunk of `steps` whose last `decay_steps` are past the warm-up: (progress at the
        first of them, advance per step, cap). The rest of the decay is spread over the training time
        left at the present step time; a chunk that uses up that time ends the decay exactly."""
        left, per = self.training_seconds_left(), self.seconds_per_step
        if decay_steps <= 0 or not self.measured:
            per_step = 0.0
        elif left - steps * per < 0.5 * per:  # the last chunk
            per_step = (1.0 - self.progress) / decay_steps
        else:
            per_step = (1.0 - self.progress) * per / left
        cap = min(1.0, self.progress + decay_steps * per_step)
        self._segment = cap
        return self.progress, per_step, cap

    def planned_steps(self, step) -> int:
        """The step count the run would reach at the present step time (for the progress bar and the log)."""
        return step + int(self.training_seconds_left() // max(self.seconds_per_step, 1e-9))
