"""The loop of a run: calls of the compiled steps, validations and checkpoints, as the cadence says.

It does no TensorFlow work itself: `hooks` runs the steps, validates and saves (the trainer's
`RunHooks`; the tests' planner harness passes fakes that only move a fake clock), and the loop
decides when, from a `cadence.StepCadence` (a run of known length) or a `cadence.BudgetPlanner`
(a time budget), and keeps `timing` (where the process's time went: timing.json).
"""

from __future__ import annotations

import dataclasses
import time


@dataclasses.dataclass
class LoopResult:
    step: int
    stopped_early: bool = False
    validated_last: bool = False  # the last step was validated before the loop ended


class Hooks:
    """What the loop asks of a run (the trainer's `RunHooks` implements it)."""

    warmup_steps = 0

    def train(self, steps: int) -> float:
        """Run `steps` optimizer steps; their mean loss."""
        raise NotImplementedError

    def set_segment(self, step, progress, per_step, cap):
        """The schedule's progress by time for the next call (budget runs)."""

    def change_input(self, step) -> bool:
        """Whether the run changed its training input before the next call (a new image size: the
        next call traces the step again, and the step time is to be measured anew)."""
        return False

    def cap_warmup(self, step, planned_steps):
        """A budget run's warm-up, fitted once to the steps first planned."""

    def probe_validation(self, batches: int) -> list:
        """Run the first `batches` val batches once, discarding their scores; each one's seconds."""
        return []

    def validate(self, step: int, final: bool, batches) -> bool:
        """Score the run at `step` (the first `batches` val batches, None: all); whether it improved."""
        raise NotImplementedError

    def save_best(self, step: int):
        """After a validation that improved: the best model and its metrics."""

    def checkpoint(self, step: int):
        raise NotImplementedError

    def should_stop(self, final: bool) -> bool:
        """Early stopping, after a validation."""
        return False

    def progress(self, step: int, target: int, loss: float):
        """The progress bar."""

    def log(self, line: str):
        pass


# Val batches a budget run runs once before its first validation, to time them (`BudgetPlanner.record_probe`).
PROBE_BATCHES = 3


def new_timing(start_up_seconds) -> dict:
    return {"start_up_seconds": start_up_seconds, "step_seconds": 0.0, "validation_seconds": 0.0,
            "checkpoint_seconds": 0.0, "validations": 0, "steps": 0}


def run_loop(hooks: Hooks, step: int, steps_per_call: int, *, cadence=None, planner=None, total_steps=None,
             timing=None, clock=time.perf_counter) -> LoopResult:
    """Train from `step` until `total_steps` (with `cadence`) or until the planner's training time is
    used up (with `planner`), validating and checkpointing on the way and at the end."""
    timing = new_timing(0.0) if timing is None else timing
    compiled = False
    validated_at = None

    def timed(key, call, *args):
        started = clock()
        result = call(*args)
        seconds = clock() - started
        timing[key] += seconds
        return result, seconds

    def validation_event(final, checkpoint=True):
        nonlocal validated_at
        batches = planner.val_batches if planner is not None else None
        improved, seconds = timed("validation_seconds", hooks.validate, step, final, batches)
        timing["validations"] += 1
        saves = 0.0
        if improved:
            _, saves = timed("validation_seconds", hooks.save_best, step)
            if planner is not None and planner.validations_done > 0:
                planner.record_save(saves)  # the first save also traces the model: not a measure
        stop = hooks.should_stop(final)
        checkpoint_seconds = 0.0
        if checkpoint or final or stop:
            _, checkpoint_seconds = timed("checkpoint_seconds", hooks.checkpoint, step)
        if planner is not None:
            planner.record_validation(seconds, saves + checkpoint_seconds, final=final)
            if checkpoint_seconds:
                planner.record_save(checkpoint_seconds)
        validated_at = step
        return stop

    probed = False
    while True:
        if hooks.change_input(step):
            compiled = False
            if planner is not None:
                planner.forget_step_time()
        if planner is not None:
            n = planner.chunk_steps(step, steps_per_call if compiled else min(2, steps_per_call))
            if n == 0:  # the training time is used up: the run ends validated
                if validated_at != step:
                    stopped = validation_event(final=True)
                    return LoopResult(step, stopped_early=stopped, validated_last=True)
                break
            decay_from = max(step, hooks.warmup_steps)
            decay_steps = max(0, step + n - decay_from)
            hooks.set_segment(decay_from, *planner.segment(n, decay_steps))
        else:
            if step >= total_steps:
                break
            # The first call compiles: a short one.
            limit = step + (steps_per_call if compiled else min(2, steps_per_call))
            limit = min(limit, total_steps, cadence.next_validation(step), cadence.next_checkpoint(step))
            n = max(1, limit - step)
        loss, seconds = timed("step_seconds", hooks.train, n)
        timing["steps"] += n
        step += n
        if planner is not None and compiled:  # the first call holds the compilation
            planner.record_steps(n, seconds)
            if not probed:
                probed = True
                hooks.cap_warmup(step, planner.planned_steps(step))
                # The validations' cost, measured before the first is planned: tracing, then a batch;
                # and a checkpoint's (a validation's saves come with it), which also makes the run
                # resumable early.
                batch_seconds, _ = timed("validation_seconds", hooks.probe_validation, PROBE_BATCHES)
                if batch_seconds:
                    planner.record_probe(batch_seconds)
                _, checkpoint_seconds = timed("checkpoint_seconds", hooks.checkpoint, step)
                planner.record_save(checkpoint_seconds)
                planner.choose_val_batches()
        compiled = True
        hooks.progress(step, planner.planned_steps(step) if planner is not None else total_steps, loss)

        if planner is not None:
            final = planner.measured and planner.chunk_steps(step, steps_per_call) == 0
            validate = final or planner.validation_due(step)
            # With every validation, or every --checkpoint-every steps.
            checkpoint = (cadence is None and validate) or (cadence is not None
                                                            and step >= cadence.next_checkpoint(step - n))
        else:
            final = step >= total_steps
            validate = final or step >= cadence.next_validation(step - n)
            checkpoint = final or step >= cadence.next_checkpoint(step - n)
        if validate:
            if validation_event(final, checkpoint):
                return LoopResult(step, stopped_early=True, validated_last=True)
            if final:
                return LoopResult(step, validated_last=True)
            if planner is not None and planner.chunk_steps(step, steps_per_call) == 0:
                # Not one more step fits before a final validation: the one just done is the last.
                hooks.log(f"time budget: step {step}'s validation is the last; the run ends here")
                return LoopResult(step, validated_last=True)
        elif checkpoint:
            timed("checkpoint_seconds", hooks.checkpoint, step)
    return LoopResult(step, validated_last=validated_at == step)
