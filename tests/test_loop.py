"""The training loop: exact resume after SIGKILL, gradient accumulation, time budgets, --resume's rules,
and what --precision auto decides."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_seg import data, demo, distribute
from keras_seg import train as train_cli
from keras_seg.models.presets import build_model, get_preset
from keras_seg.training.trainer import Trainer

from test_train import REPO, make_config, read_history, tiny_data  # noqa: F401 (fixture)

TINY = ["--image-size", "64x128", "--model-arg", "depth=3", "--model-arg", "base_filters=8", "--batch-size", "4",
        "--val-batch-size", "4", "--precision", "float32", "--strategy", "one", "--seed", "1", "--no-progress",
        "--no-export"]


def _cpu_steal_seconds():
    """CPU time the hypervisor gave to others (summed over cores), from /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            return int(f.readline().split()[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class TimedRun:
    """A command run to its end, each line of its output stamped with the seconds since its start, so
    that a run that ends late shows where the time went (the machine's steal time and load beside)."""

    def __init__(self, command, env, timeout, cwd=None):
        steal = _cpu_steal_seconds()
        started = time.time()
        lines = []
        with tempfile.TemporaryFile("w+") as errors:
            # Unbuffered, so that each line arrives when it is printed.
            env = dict(env or os.environ, PYTHONUNBUFFERED="1")
            process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=errors, text=True)
            reader = threading.Thread(target=lambda: lines.extend((time.time() - started, line.rstrip("\n"))
                                                                  for line in process.stdout))
            reader.start()
            try:
                self.returncode = process.wait(timeout=timeout)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
                reader.join()
            self.wall = time.time() - started
            errors.seek(0)
            self.stderr = errors.read()
        self.stdout = "".join(line + "\n" for _, line in lines)
        stolen = None if steal is None else round(_cpu_steal_seconds() - steal, 1)
        self.report = (f"exit code {self.returncode} after {self.wall:.1f} s, CPU steal {stolen} s, load average "
                       f"{os.getloadavg()[0]:.2f}; the run printed (seconds since its start):\n"
                       + "\n".join(f"{at:7.2f}  {line}" for at, line in lines)
                       + ("" if self.returncode == 0 else "\nstderr:\n" + self.stderr[-3000:]))


@pytest.fixture(autouse=True)
def _restore_policy():
    yield
    keras.mixed_precision.set_dtype_policy("float32")


def quiet(_):
    pass


@pytest.fixture(scope="module")
def pass_data(tmp_path_factory):
    """64 demo scenes (16 steps of 4 a pass) and 8 for validation."""
    directory = str(tmp_path_factory.mktemp("pass") / "data")
    demo.write_demo_dataset(directory, splits={"train": 64, "val": 8}, size=(64, 128), log=quiet)
    return directory


@pytest.mark.slow
def test_resume_after_sigkill_continues_the_uninterrupted_run(pass_data, tmp_path):
    """A real subprocess killed with SIGKILL mid-epoch, with a file cache whose lock it leaves behind;
    the resumed run restores the checkpoint's step and ends with the uninterrupted run's weights."""
    # 16 steps a pass: the kill falls in the first pass, while the cache is being filled. Augmentation
    # on (seeded by the step), SGD with momentum and a poly schedule (both carry state).
    length = ["--iters", "40", "--checkpoint-every", "3", "--val-every", "20", "--steps-per-call", "1",
              "--optimizer", "sgd", "--learning-rate", "0.05", "--schedule", "poly", "--warmup-iters", "4"]
    env = dict(os.environ, PYTHONPATH=REPO)

    def command(run, *extra):
        # Every run in a subprocess of its own: the test process splits its CPU into two logical
        # devices, which changes the order of floating-point sums.
        return [sys.executable, "-m", "keras_seg.train", "--preset", "unet_small", "--data", pass_data,
                "--output", str(run), *extra]

    whole = subprocess.run(command(tmp_path / "whole", "--cache", str(tmp_path / "c1"), *TINY, *length), env=env,
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]

    run = tmp_path / "killed"
    killed_command = command(run, "--cache", str(tmp_path / "c2"), *TINY, *length)
    process = subprocess.Popen(killed_command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.time() + 180
        while int((tf.train.latest_checkpoint(str(run / "checkpoints")) or "-0").rsplit("-", 1)[1]) < 6:
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint at step 6 in time"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    latest = tf.train.latest_checkpoint(str(run / "checkpoints"))
    checkpoint_step = int(latest.rsplit("-", 1)[1])
    assert 6 <= checkpoint_step < 40

    resumed = subprocess.run(command(run, "--resume", "--no-progress"), env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {run} at step {checkpoint_step} " in resumed.stdout
    expected = keras.saving.load_model(tmp_path / "whole" / "last.keras", compile=False).get_weights()
    got = keras.saving.load_model(run / "last.keras", compile=False).get_weights()
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    final = [re.findall(r"^weights fingerprint ([0-9a-f]{16})", out, re.M) for out in (whole.stdout, resumed.stdout)]
    assert final[0] and final[0] == final[1]
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["provenance"]["command"].split(" -m ", 1)[1] == " ".join(killed_command).split(" -m ", 1)[1]
    assert len(recorded["provenance"]["resumes"]) == 1
    steps = [int(r["step"]) for r in read_history(run)]
    assert steps == [20, 40]


FILL_CACHE = """
import sys, time
from keras_seg.data import build_dataset
ds = build_dataset(sys.argv[1], "train", training=True, repeat=True, batch_size=2, image_size=(64, 128),
                   shuffle_seed=0, shuffle_buffer=2, cache=sys.argv[2])
iterator = iter(ds)
next(iterator)
print("filling", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_a_cache_left_locked_by_sigkill_is_reclaimed(pass_data, tmp_path):
    """SIGKILL while tf.data fills a file cache leaves its lock file (on which TensorFlow refuses to
    read: "concurrent caching iterator"); the next run removes it, as no live process holds the
    prefix, and reads the data."""
    prefix = str(tmp_path / "cache")
    process = subprocess.Popen([sys.executable, "-c", FILL_CACHE, pass_data, prefix], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    try:
        assert process.stdout.readline().strip() == "filling"
        holder = data.claim_file_cache(prefix + "-other")  # an unrelated prefix is free
        holder.close()
    finally:
        process.kill()
        process.wait()
    assert any(name.endswith(".lockfile") for name in os.listdir(tmp_path)), os.listdir(tmp_path)
    common = dict(training=True, repeat=True, batch_size=2, image_size=(64, 128), shuffle_seed=0,
                  shuffle_buffer=2, cache=prefix)
    removed = []
    lock = data.claim_file_cache(prefix, log=removed.append)
    assert removed and all("left by an interrupted run" in line for line in removed)
    assert not any(name.endswith(".lockfile") or ".tempstate" in name for name in os.listdir(tmp_path))
    batches = list(data.build_dataset(pass_data, "train", **common).take(40))  # more than a pass: cache complete
    assert len(batches) == 40
    with pytest.raises(ValueError, match="another running process uses this cache prefix"):
        data.claim_file_cache(prefix)
    lock.close()


@pytest.mark.slow  # 9 s on CPU-E (a trainer run); tests/test_accumulate.py's step test stays
def test_accumulating_two_batches_equals_one_batch_of_twice_the_size(tiny_data, tmp_path):  # noqa: F811
    """No batch norm (its statistics would differ by design); SGD, so the gradient scale matters."""
    weights = {}
    for name, batch, accumulate in (("one", "4", "1"), ("accumulated", "2", "2")):
        config = make_config(tiny_data, tmp_path / name, "--iters", "3", "--no-augment", "--batch-size", batch,
                             "--accumulate", accumulate, "--model-arg", "batch_norm=false", "--optimizer", "sgd",
                             "--learning-rate", "0.1", "--warmup-iters", "0", "--clipnorm", "0", "--loss", "ce",
                             "--class-weights", "none", "--no-export")
        trainer = Trainer(config, log=quiet)
        trainer.run()
        assert trainer.shape.examples_per_step == 4
        weights[name] = trainer.model.get_weights()
    initial = make_config(tiny_data, tmp_path / "x", "--iters", "1", "--model-arg", "batch_norm=false")
    keras.utils.set_random_seed(initial.seed)
    start = build_model({"model": initial.model, "input_size": (64, 128)}, 19).get_weights()
    assert max(np.abs(a - b).max() for a, b in zip(start, weights["one"])) > 1e-3  # it trained
    for a, b in zip(weights["one"], weights["accumulated"]):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


SLOWED_TRAIN = """
import sys, time
from keras_seg import train
from keras_seg.training.trainer import Trainer

started, original = time.time(), Trainer.train

def slowed(self, steps):
    t = time.perf_counter()
    loss = original(self, steps)
    if time.time() - started > 20:  # from then on every step takes twice as long
        time.sleep(time.perf_counter() - t)
    return loss

Trainer.train = slowed
train.command(sys.argv[1:])
"""


@pytest.mark.slow
def test_time_budget_ends_on_time_through_a_slowdown(tiny_data, tmp_path):  # noqa: F811
    """The command line with a 2-minute budget, in a process of its own (the budget counts from its
    start); 20 s in, every step takes twice as long (a sleep after each compiled call). The run,
    its validations and the export end within 5% of the budget, and the schedule reaches its end
    value at the last step. (With 1 minute, 5% was 3 s, the size of the single hiccups of a shared
    CPU-B: 58.5-63.6 s over 7 runs.)"""
    run = tmp_path / "run"
    command = [sys.executable, "-c", SLOWED_TRAIN, "--preset", "unet_small", "--data", tiny_data, "--output", str(run),
               *[a for a in TINY if a != "--no-export"], "--model-arg", "base_filters=16", "--time-budget", "2",
               "--schedule", "linear"]
    result = TimedRun(command, env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    assert result.returncode == 0, result.report
    assert 114 <= result.wall <= 126, result.report
    history = read_history(run)
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["resolved"]["total_steps"] == int(history[-1]["step"])
    assert float(history[-1]["learning_rate"]) == pytest.approx(0.0, abs=1e-9)  # linear-to-zero reached zero
    assert float(history[0]["learning_rate"]) > 0
    assert (run / "saved_model" / "run" / "1" / "saved_model.pb").is_file()


@pytest.mark.slow  # 23 s on CPU-E (a trainer run)
def test_the_training_iterator_outlives_its_run_until_the_next(tiny_data, pass_data, tmp_path):  # noqa: F811
    """Deleting it can wait up to a minute for tf.data's autotuning thread: a run keeps it past its
    end (the command line then exits without deleting it), and the next run in the process drops it;
    not with a file cache, whose partial files TensorFlow removes when the iterator goes."""
    from keras_seg.training import trainer as trainer_module

    first = Trainer(make_config(tiny_data, tmp_path / "a", "--iters", "2", "--no-export"), log=quiet)
    first.run()
    kept = trainer_module._KEPT_ITERATORS
    assert len(kept) == 1 and kept[0]._iterators  # a live tf.distribute iterator
    images, _ = next(kept[0])  # still usable: nothing has deleted it
    assert images.shape[1:] == (64, 128, 3)
    before = kept[0]
    Trainer(make_config(tiny_data, tmp_path / "b", "--iters", "2", "--no-export"), log=quiet).run()
    assert len(kept) == 1 and kept[0] is not before
    # With a file cache the iterator goes with its run, so that TensorFlow removes a partial cache
    # (2 steps of 4 of the 64 examples: the first pass, which fills the cache, is not done).
    Trainer(make_config(pass_data, tmp_path / "c", "--iters", "2", "--no-export", "--cache",
                        str(tmp_path / "cache" / "c")), log=quiet).run()
    assert kept == []
    assert not [name for name in os.listdir(tmp_path / "cache") if ".lockfile" in name or ".tempstate" in name]


def _fake_run(directory, recorded=None):
    (directory / "checkpoints").mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(recorded or {"resolved": {"total_steps": 10}}))


@pytest.mark.parametrize("flag,value", [("--learning-rate", "0.1"), ("--batch-size", "2"), ("--seed", "3"),
                                        ("--augment", "flip_prob=0"), ("--data", "/somewhere")])
def test_resume_refuses_a_flag_that_would_change_the_run(flag, value, tmp_path, capsys):
    _fake_run(tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--output", str(tmp_path / "run"), "--resume", flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: --resume continues {tmp_path / 'run'} as recorded: {flag} cannot change")


def test_resume_refuses_a_run_of_an_earlier_version(tmp_path, capsys):
    # earlier keras-seg: epoch checkpoints without a step counter, a config without a resolved length
    _fake_run(tmp_path / "run", {"epochs": 21, "time_limit": 0, "resolved": {"steps_per_epoch": 334}})
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--output", str(tmp_path / "run"), "--resume"])
    assert exit_info.value.code == 2
    assert "was trained by an earlier keras-seg" in capsys.readouterr().err


def test_resume_accepts_a_new_length(tmp_path):
    config = make_config(str(tmp_path), tmp_path / "run", "--iters", "10")
    config.resolved = {"total_steps": 10}
    _fake_run(tmp_path / "run", config.to_dict())
    args = train_cli.build_parser().parse_args(["--output", str(tmp_path / "run"), "--resume", "--time-budget", "5"])
    resumed = train_cli.resumed_config(str(tmp_path / "run"), args, [])
    assert (resumed.iters, resumed.time_budget, resumed.learning_rate) == (0, 5.0, config.learning_rate)


@pytest.mark.parametrize("capabilities,expected", [
    ([(8, 0)], "mixed_bfloat16"), ([(9, 0), (9, 0)], "mixed_bfloat16"), ([(7, 5)], "mixed_float16"),
    ([(7, 0)], "mixed_float16"), ([(6, 1)], "float32"), ([(8, 6), (7, 5)], "mixed_float16"),
])
def test_precision_auto_on_gpus_by_compute_capability(monkeypatch, capabilities, expected):
    gpus = [f"GPU:{i}" for i in range(len(capabilities))]
    details = dict(zip(gpus, capabilities))
    monkeypatch.setattr(tf.config.experimental, "get_device_details",
                        lambda gpu: {"device_name": "mock", "compute_capability": details[gpu]})
    monkeypatch.setattr(distribute, "cpu_bfloat16", lambda: "amx")  # a GPU decides, not the CPU
    policy, why = distribute.choose_precision("auto", gpus=gpus)
    assert policy == expected
    major, minor = min(capabilities)
    assert f"compute capability {major}.{minor}" in why


def test_bfloat16_numerics_on_a_fixed_batch(tiny_data):  # noqa: F811
    """The same weights and batch in float32 and mixed_bfloat16: logits, loss and gradients agree to
    bfloat16's precision (8 mantissa bits: ~0.4% per rounding). This is what mixed_bfloat16 training
    rests on, checked without comparing two noisy trainings."""
    from keras_seg import losses
    from keras_seg.data import build_dataset

    images, masks = next(iter(build_dataset(tiny_data, "train", training=False, batch_size=4,
                                            image_size=(64, 128))))
    entry = {"model": {"architecture": "unet", "depth": 3, "base_filters": 16, "stem_stride": 2},
             "input_size": (64, 128)}
    loss_fn = losses.build_loss("ce+dice", num_classes=19)
    results = {}
    for policy in ("float32", "mixed_bfloat16"):
        keras.mixed_precision.set_dtype_policy(policy)
        keras.utils.set_random_seed(0)
        model = build_model(entry, 19)
        if policy == "float32":
            weights = model.get_weights()
        else:
            model.set_weights(weights)
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = loss_fn(masks, logits)
        grads = tape.gradient(loss, model.trainable_variables)
        results[policy] = (logits.numpy(), float(loss), np.concatenate([tf.reshape(g, [-1]).numpy() for g in grads]))
    (l32, loss32, g32), (l16, loss16, g16) = results["float32"], results["mixed_bfloat16"]
    assert l16.dtype == np.float32  # logits in float32 under the mixed policy
    assert np.abs(l16 - l32).max() <= 0.05 * np.abs(l32).max()
    assert loss16 == pytest.approx(loss32, rel=0.01)
    cosine = float(g16 @ g32 / np.linalg.norm(g16) / np.linalg.norm(g32))
    assert cosine > 0.99, cosine


def _strict_json(text):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_json_the_tool_writes_is_valid_json(tmp_path):
    """NaN (a class absent from the data has no IoU) is written as null, which jq and browsers read."""
    from keras_seg.files import write_json_atomically

    write_json_atomically(tmp_path / "m.json", {"miou": np.float32(0.5), "per_class_iou": np.array([0.25, np.nan]),
                                                "nested": {"x": float("inf")}})
    assert _strict_json((tmp_path / "m.json").read_text()) == {"miou": 0.5, "per_class_iou": [0.25, None],
                                                                "nested": {"x": None}}


@pytest.mark.slow  # 14 s on CPU-E (a trainer run)
def test_a_new_length_on_resume_refits_the_schedule(tiny_data, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    config = make_config(tiny_data, run, "--iters", "6", "--val-every", "3", "--schedule", "linear",
                         "--warmup-iters", "0", "--no-export")

    def stop_at_step_3(line):
        if line.startswith("step 3/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(config, log=stop_at_step_3).run()
    args = train_cli.build_parser().parse_args(["--output", str(run), "--resume", "--iters", "12", "--no-progress"])
    resumed = train_cli.resumed_config(str(run), args, [])
    lines = []
    trainer = Trainer(resumed, log=lines.append)
    assert float(trainer.config.learning_rate) == config.learning_rate
    trainer.run()
    assert "the schedule now ends at step 12 (was 6)" in lines
    assert int(trainer.step.numpy()) == 12
    # linear from 1.0 at step 0: 0.5 at step 3 (of 6); then from 0.5 down to 0 over steps 3..12
    assert float(trainer.schedule(3)) == pytest.approx(0.5 * config.learning_rate)
    assert float(trainer.schedule(6)) == pytest.approx(0.5 * config.learning_rate * 6 / 9)
    assert float(trainer.schedule(12)) == pytest.approx(0.0)


@pytest.mark.slow
def test_the_default_command_ends_within_its_budget_with_fresh_demo_data(tmp_path):
    """`python -m keras_seg.train` with no --data, as a new user runs it, demo data written afresh into an
    empty cache (its writing counts against the budget), here with a 1.5-minute budget: the process ends
    within 5% of it, and the run's validation reports a real mIoU."""
    env = dict(os.environ, PYTHONPATH=REPO, KERAS_SEG_CACHE=str(tmp_path / "cache"))
    command = [sys.executable, "-m", "keras_seg.train", "--output", str(tmp_path / "run"), "--time-budget", "1.5",
               "--no-progress"]
    result = TimedRun(command, env=env, timeout=400, cwd=str(tmp_path))
    assert result.returncode == 0, result.report
    assert result.wall <= 1.05 * 90, result.report
    assert "writing the demo dataset" in result.stdout
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["demo"] is True and recorded["preset"] == "unet_silu"
    assert 0.0 < json.loads((tmp_path / "run" / "best_metrics.json").read_text())["miou"] <= 1.0


def test_resume_compares_encoder_flags_against_the_runs_own_preset(tmp_path, capsys):
    """Without --preset, a resumed run's flags resolve against its recorded preset (here one with an
    encoder), not the parser's default: --freeze-encoder is refused as a change, not as unknown."""
    recorded = {"preset": "unet_mobilenetv3", "model": get_preset("unet_mobilenetv3")["model"],
                "encoder_weights": "none", "resolved": {"total_steps": 10}}
    _fake_run(tmp_path / "run", json.loads(json.dumps(recorded)))
    with pytest.raises(SystemExit):
        train_cli.main(["--output", str(tmp_path / "run"), "--resume", "--freeze-encoder", "100"])
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --resume continues {tmp_path / 'run'} as recorded: --freeze-encoder cannot change")
