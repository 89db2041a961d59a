"""The training core, one concept a module, in the order a run uses them.

    setup.py            a run's numbers (batch, steps an epoch, rate), its state (models, optimizer,
                        schedule, counters, checkpoint) and its input streams
    step.py             the optimizer, the compiled train step and the evaluation step
    schedules.py        the learning rate as a function of the step, or of the time spent
    cadence.py          when to validate and checkpoint; what a time budget leaves for training, and how
                        the schedule follows it (no TensorFlow)
    loop.py             the loop that runs steps, validations and checkpoints as the cadence says
    outputs.py          what a run writes: config.json, history, TensorBoard, best model, report, export
    precision_probe.py  `--precision auto`: the run's own step timed in float32 and bfloat16
    trainer.py          `Trainer`: one run from its config to its run directory

Nothing here is imported by the package root until used: `from keras_seg.training.trainer import Trainer`.
"""
