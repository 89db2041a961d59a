"""`--precision auto` on a CPU with bfloat16 instructions: the faster precision of the run's own step where the
run is long enough to pay for the measurement; otherwise mixed_bfloat16 with AMX, float32 without it."""

import json
import os
from types import SimpleNamespace

import keras
import pytest
import tensorflow as tf

from keras_seg import distribute
from keras_seg.training import precision_probe
from keras_seg.training.trainer import Trainer

from test_train import make_config, tiny_data  # noqa: F401 (fixture)

# Flag lines as `lscpu`/`/proc/cpuinfo` give them (trimmed): CPU-D (Intel, AMX), CPU-C (AMD EPYC family 26:
# avx512_bf16, no AMX), and an AVX2-only AMD.
INTEL_AMX = "flags : fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8"
AMD_AVX512_BF16 = "flags : fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 avx_vnni"
AMD_AVX2 = "flags : fpu sse2 avx avx2 fma bmi2"


@pytest.fixture(autouse=True)
def _restore_policy():
    yield
    keras.mixed_precision.set_dtype_policy("float32")


@pytest.mark.parametrize("flags,kind,policy", [
    (INTEL_AMX, "amx", distribute.MEASURE),
    (AMD_AVX512_BF16, "avx512_bf16", distribute.MEASURE),
    (AMD_AVX2, None, "float32"),
])
def test_the_rule_on_each_kind_of_cpu(monkeypatch, tmp_path, flags, kind, policy):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\n" + flags + "\n")
    assert distribute.cpu_bfloat16(str(cpuinfo)) == kind
    monkeypatch.setattr(distribute, "cpu_bfloat16", lambda: kind)
    assert distribute.choose_precision("auto", gpus=[])[0] == policy
    # An explicit --precision is never measured.
    assert distribute.choose_precision("mixed_bfloat16", gpus=[]) == ("mixed_bfloat16", "--precision mixed_bfloat16")


def _fake_trainer(time_budget=0.0, fixed_steps=None, resume=False, resolved=None, strategy=None):
    config = SimpleNamespace(time_budget=time_budget, resume=resume, resolved=resolved or {}, iters=fixed_steps or 0,
                             epochs=0)
    return SimpleNamespace(config=config, strategy=strategy or tf.distribute.get_strategy(),
                           shape=SimpleNamespace(steps_per_epoch=1))


class ScriptedSampler:
    """Step times per precision, in turn from a list (repeated), and the calls made."""

    def __init__(self, seconds):
        self.seconds = {name: list(value) if isinstance(value, (list, tuple)) else [value]
                        for name, value in seconds.items()}
        self.calls = []

    def sample(self, precision):
        times = self.seconds[precision]
        value = times[sum(call == precision for call in self.calls) % len(times)]
        self.calls.append(precision)
        return value


@pytest.mark.parametrize("seconds,expected", [
    ({"float32": 0.512, "mixed_bfloat16": 0.671}, "float32"),  # CPU-C's LR-ASPP (DEPLOY_NOTES.md)
    ({"float32": 0.360, "mixed_bfloat16": 0.330}, "mixed_bfloat16"),
])
def test_a_long_budget_keeps_the_faster_measured_precision(seconds, expected):
    sampler = ScriptedSampler(seconds)
    policy, why, measured = precision_probe.choose(_fake_trainer(time_budget=35), sampler, log=lambda _: None,
                                                   cpu="avx512_bf16")
    assert policy == expected and measured == seconds
    # float32 first (this CPU's unmeasured choice), then in turn; steady steps separate at the third round
    assert sampler.calls == ["float32"] * 3 + ["mixed_bfloat16", "float32", "float32", "mixed_bfloat16",
                                               "mixed_bfloat16", "float32"]
    faster, slower = sorted(seconds, key=seconds.get)
    assert why == (f"auto: measured {round(1000 * seconds[faster])} ms {faster} vs {round(1000 * seconds[slower])} "
                   f"ms {slower} a step (a CPU with AVX512-BF16 but no AMX, 3 steps each)")


def test_steps_that_vary_more_than_they_differ_keep_float32():
    """A shared 2-core machine's float32 steps (357, 214, 469 ms) beside bfloat16 steps 10% faster on
    average: the medians never separate beyond the spreads, the rounds stop at their most, float32 stays."""
    sampler = ScriptedSampler({"float32": [0.357, 0.214, 0.469], "mixed_bfloat16": [0.32, 0.19, 0.42]})
    policy, why, measured = precision_probe.choose(_fake_trainer(time_budget=35), sampler, log=lambda _: None,
                                                   cpu="avx512_bf16")
    assert policy == "float32" and measured["mixed_bfloat16"] < measured["float32"]
    assert sampler.calls.count("mixed_bfloat16") == precision_probe.MAX_ROUNDS
    assert "within their spread over 15 steps each: float32" in why


def test_the_measurement_stops_at_its_time_bound():
    clock = iter(range(0, 1000, 70))  # the measurement starts at 0; 70 s have passed at its first look
    sampler = ScriptedSampler({"float32": [0.357, 0.214, 0.469], "mixed_bfloat16": [0.32, 0.19, 0.42]})
    precision_probe.choose(_fake_trainer(time_budget=35), sampler, log=lambda _: None, cpu="avx512_bf16",
                           clock=lambda: next(clock))
    assert sampler.calls.count("mixed_bfloat16") == precision_probe.MIN_ROUNDS  # 70 s > 60 s after 3 rounds


@pytest.mark.parametrize("cpu, expected", [("avx512_bf16", "float32"), ("amx", "mixed_bfloat16")])
def test_a_short_budget_is_not_measured(cpu, expected):
    sampler = ScriptedSampler({})
    policy, why, measured = precision_probe.choose(_fake_trainer(time_budget=6), sampler, cpu=cpu)
    assert (policy, measured, sampler.calls) == (expected, {}, []) and "6-min budget" in why


def test_with_amx_bfloat16_is_timed_first_and_float32_kept_when_faster():
    """CPU-D (AMX), tools/bench_models.py: LR-ASPP MobileNetV3-Small at 128x256 trained at 37.7 img/s in
    float32 and 28.1 in mixed_bfloat16."""
    seconds = {"mixed_bfloat16": 8 / 28.1, "float32": 8 / 37.7}
    sampler = ScriptedSampler(seconds)
    policy, why, _ = precision_probe.choose(_fake_trainer(time_budget=35), sampler, log=lambda _: None, cpu="amx")
    assert policy == "float32" and sampler.calls[:3] == ["mixed_bfloat16"] * 3
    assert why == "auto: measured 212 ms float32 vs 285 ms mixed_bfloat16 a step (a CPU with AMX, 3 steps each)"
    # A fixed-length run whose bfloat16 steps make less than the minimum keeps bfloat16 unmeasured against.
    sampler = ScriptedSampler(seconds)
    assert precision_probe.choose(_fake_trainer(fixed_steps=100), sampler, log=lambda _: None,
                                  cpu="amx")[0] == "mixed_bfloat16"
    assert set(sampler.calls) == {"mixed_bfloat16"}


@pytest.mark.parametrize("steps,expected,timed", [
    (1000, "float32", {"float32"}),  # 1000 x 0.5 s = 8.3 min: bfloat16 is not timed
    (1300, "mixed_bfloat16", {"float32", "mixed_bfloat16"}),  # 10.8 min
])
def test_a_fixed_length_run_is_measured_when_its_float32_length_pays(steps, expected, timed):
    sampler = ScriptedSampler({"float32": 0.5, "mixed_bfloat16": 0.4})
    policy, why, _ = precision_probe.choose(_fake_trainer(fixed_steps=steps), sampler, log=lambda _: None,
                                            cpu="avx512_bf16")
    assert (policy, set(sampler.calls)) == (expected, timed)


def test_several_workers_and_a_resume_do_not_measure(monkeypatch):
    sampler = ScriptedSampler({})
    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy", SimpleNamespace)
    workers = _fake_trainer(time_budget=35, strategy=SimpleNamespace())
    assert precision_probe.choose(workers, sampler, cpu="avx512_bf16")[0] == "float32"
    assert precision_probe.choose(workers, sampler, cpu="amx")[0] == "mixed_bfloat16"
    resumed = _fake_trainer(time_budget=35, resume=True, resolved={"precision": "mixed_bfloat16"})
    assert precision_probe.choose(resumed, sampler)[:2] == (
        "mixed_bfloat16", "auto: mixed_bfloat16, as the run being resumed chose")
    assert sampler.calls == []


@pytest.mark.slow  # 17 s on CPU-E (a trainer run); the mocked branches stay
def test_a_real_start_up_measurement_picks_the_faster_and_records_both(monkeypatch, tiny_data, tmp_path):  # noqa: F811
    """On a CPU said to have AVX512-BF16 without AMX, a 2-step run times its own step in both precisions,
    trains in the faster and records both timings and the choice in config.json and its log."""
    monkeypatch.setattr(distribute, "cpu_bfloat16", lambda: "avx512_bf16")
    monkeypatch.setattr(precision_probe, "MIN_RUN_MINUTES", 0.0)  # a 2-step run would not pay here
    config = make_config(tiny_data, tmp_path / "run", "--iters", "2", "--precision", "auto", "--no-export",
                         "--warmup-iters", "0")
    lines = []
    Trainer(config, log=lines.append).run()
    with open(os.path.join(tmp_path / "run", "config.json")) as f:
        resolved = json.load(f)["resolved"]
    measured = resolved["precision_seconds_per_step"]
    assert set(measured) == {"float32", "mixed_bfloat16"} and all(s > 0 for s in measured.values())
    faster = min(measured, key=measured.get)
    assert resolved["precision"] == faster
    assert resolved["precision_reason"].startswith(f"auto: measured {round(1000 * measured[faster])} ms {faster}")
    assert any(line == f"precision {faster}: {resolved['precision_reason']}" for line in lines)
    # The run trained in that precision: its saved model's layers compute in it.
    model = keras.saving.load_model(os.path.join(tmp_path / "run", "last.keras"), compile=False)
    expected_compute = "bfloat16" if faster == "mixed_bfloat16" else "float32"
    assert model.layers[1].dtype_policy.compute_dtype == expected_compute
