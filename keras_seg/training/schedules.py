"""Learning-rate schedules: a linear warm-up, then a decay shape that ends at a known step.

    lr(step) = base * scale * (w + (1 - w) * step / warmup_steps)   while step < warmup_steps (w: warmup_start)
    lr(step) = base * scale * shape(progress)                        after

`shape` is one of SHAPES, of the progress p in [0, 1] through the decay phase:

    constant   1
    cosine     f + (1 - f) * (1 + cos(pi p)) / 2
    poly       f + (1 - f) * (1 - p) ** power            (MMSegmentation's and DeepLab's "poly")
    linear     f + (1 - f) * (1 - p)                     (linear-to-zero with f = 0)

with f the final ratio (`final_ratio`). `scale` is 1 until reduce-on-plateau cuts it.

The progress p is counted in steps in a run of known length: from the end of the warm-up to
`total_steps`. `retarget(step, total)` moves that end (a resumed run given a new length) without a
jump in the learning rate: the progress reached at `step` is kept (the anchor), and the rest of the
decay is spread over the steps that remain.

A time-budget run counts p in training time instead (`keras_seg.training.cadence.BudgetPlanner`):
before each call of the compiled steps the trainer sets a segment (`set_segment`): the progress at
the call's first step and its advance per step, extrapolated from the step time, up to a cap. The
step count of such a run is an outcome, not an input, so re-planning never moves the rate.

Every quantity that shapes the schedule is a variable, so a checkpoint holds the schedule as it was
when the run stopped.
"""

from __future__ import annotations

import math

import tensorflow as tf

SHAPES = ("constant", "cosine", "poly", "linear")

# The learning rate at the end of the decay, as a fraction of the base rate, by shape.
DEFAULT_FINAL_RATIO = {"constant": 1.0, "cosine": 0.01, "poly": 0.01, "linear": 0.0}


class WarmupDecaySchedule(tf.Module):
    """The learning rate as a function of the step; see the module docstring.

    Args:
        base_learning_rate: float.
        shape: one of SHAPES.
        total_steps: int, the step at which the decay ends (may be moved by `retarget`).
        warmup_steps: int, steps of linear warm-up from `warmup_start * base`.
        warmup_start: float, the warm-up's first rate as a fraction of the base.
        final_ratio: float or None, the rate at the end as a fraction of the base (None: the
            shape's default, DEFAULT_FINAL_RATIO).
        power: float, the exponent of "poly".
    """

    def __init__(self, base_learning_rate, shape="cosine", total_steps=1, warmup_steps=0, warmup_start=0.01,
                 final_ratio=None, power=0.9, name="learning_rate_schedule"):
        super().__init__(name=name)
        if shape not in SHAPES:
            raise ValueError(f"schedule shape must be one of {SHAPES}, got {shape!r}")
        self.base = float(base_learning_rate)
        self.shape = shape
        self.power = float(power)
        # A variable: a time-budget run caps its warm-up once it knows its length (`cap_warmup`),
        # and the checkpoint keeps the cap for a resume.
        self.warmup = tf.Variable(int(warmup_steps), dtype=tf.int64, trainable=False, name="warmup_steps")
        self.warmup_start = float(warmup_start)
        self.final_ratio = float(DEFAULT_FINAL_RATIO[shape] if final_ratio is None else final_ratio)
        self.total_steps = tf.Variable(int(max(total_steps, 1)), dtype=tf.int64, trainable=False, name="total_steps")
        # Progress `anchor_progress` at step `anchor_step`; the decay runs linearly from there to 1 at total_steps.
        self.anchor_step = tf.Variable(int(warmup_steps), dtype=tf.int64, trainable=False, name="anchor_step")
        self.anchor_progress = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="anchor_progress")
        self.scale = tf.Variable(1.0, dtype=tf.float64, trainable=False, name="plateau_scale")
        # By time (a budget run): progress segment_progress at segment_step, + segment_per_step a step, at
        # most segment_cap.
        self.by_time = tf.Variable(False, trainable=False, name="progress_by_time")
        self.segment_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="segment_step")
        self.segment_progress = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="segment_progress")
        self.segment_per_step = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="segment_per_step")
        self.segment_cap = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="segment_cap")

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup.numpy())

    def progress(self, step):
        """Progress through the decay phase at `step`, in [0, 1] (0 during warm-up)."""
        step = tf.cast(step, tf.float64)
        anchor_step = tf.cast(self.anchor_step, tf.float64)
        span = tf.maximum(tf.cast(self.total_steps, tf.float64) - anchor_step, 1.0)
        progress = self.anchor_progress + (step - anchor_step) * (1.0 - self.anchor_progress) / span
        by_steps = tf.where(step < anchor_step, self.anchor_progress, progress)
        ahead = tf.maximum(step - tf.cast(self.segment_step, tf.float64), 0.0)
        by_time = tf.minimum(self.segment_cap, self.segment_progress + ahead * self.segment_per_step)
        return tf.clip_by_value(tf.where(self.by_time, by_time, by_steps), 0.0, 1.0)

    def set_segment(self, step, progress, per_step=0.0, cap=None):
        """Progress by time: `progress` at `step`, + `per_step` each later step, at most `cap` (default:
        `progress`). The trainer sets it before each call of the compiled steps of a budget run."""
        self.by_time.assign(True)
        self.segment_step.assign(int(step))
        self.segment_progress.assign(float(progress))
        self.segment_per_step.assign(float(per_step))
        self.segment_cap.assign(float(progress if cap is None else cap))

    def __call__(self, step):
        step = tf.cast(step, tf.float64)
        p = self.progress(step)
        f = self.final_ratio
        if self.shape == "constant":
            factor = tf.ones_like(p)
        elif self.shape == "cosine":
            factor = f + (1.0 - f) * 0.5 * (1.0 + tf.cos(math.pi * p))
        elif self.shape == "poly":
            factor = f + (1.0 - f) * tf.pow(1.0 - p, self.power)
        else:
            factor = f + (1.0 - f) * (1.0 - p)
        warmup = tf.cast(self.warmup, tf.float64)
        ramp = self.warmup_start + (1.0 - self.warmup_start) * step / tf.maximum(warmup, 1.0)
        factor = tf.where(step < warmup, ramp, factor)
        return tf.cast(self.base * self.scale * factor, tf.float32)

    def retarget(self, step, total_steps):
        """Make the decay end at `total_steps`, continuing from the progress reached at `step` (by steps
        from then on, also in a schedule that counted by time)."""
        step = max(int(step), self.warmup_steps)
        total_steps = max(int(total_steps), step + 1)
        self.anchor_progress.assign(self.progress(step))
        self.anchor_step.assign(step)
        self.total_steps.assign(total_steps)
        self.by_time.assign(False)

    @property
    def counts_time(self) -> bool:
        return bool(self.by_time.numpy())

    def cap_warmup(self, step, total_steps):
        """Shorten the warm-up to half of `total_steps` (as a fixed-length run's), but not before
        `step`: a run planned shorter than its warm-up would otherwise end with its rate still rising.
        Returns the new length, or None when the warm-up already fits."""
        cap = max(int(step), int(total_steps) // 2)
        if cap >= self.warmup_steps:
            return None
        self.warmup.assign(cap)
        self.anchor_step.assign(cap)  # the decay starts where the warm-up now ends
        return cap

    def cut(self, factor):
        """Reduce-on-plateau: multiply every later rate by `factor`."""
        self.scale.assign(self.scale * float(factor))
