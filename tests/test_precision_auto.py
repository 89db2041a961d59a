"""`--precision auto` on a CPU with bfloat16 instructions: the faster precision of the run's own step where the
run is long enough to pay for the measurement; otherwise mixed_bfloat16 with AMX, float32 without it."""

import json
import os
from types import SimpleNamespace

import keras
import pytest
import tensorflow as tf

from keras_seg import distribute, precision_probe
from keras_seg.trainer import Trainer

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


def _timer(seconds, calls):
    def timer(trainer, precision):
        calls.append(precision)
        return seconds[precision]
    return timer


@pytest.mark.parametrize("seconds,expected", [
    ({"float32": 0.512, "mixed_bfloat16": 0.671}, "float32"),  # CPU-C's LR-ASPP (DEPLOY_NOTES.md)
    ({"float32": 0.360, "mixed_bfloat16": 0.330}, "mixed_bfloat16"),
])
def test_a_long_budget_keeps_the_faster_measured_precision(seconds, expected):
    calls = []
    policy, why, measured = precision_probe.choose(_fake_trainer(time_budget=35), _timer(seconds, calls),
                                                   log=lambda _: None, cpu="avx512_bf16")
    assert policy == expected and calls == ["float32", "mixed_bfloat16"] and measured == seconds
    faster, slower = sorted(seconds, key=seconds.get)
    assert why.startswith(f"auto: measured {round(1000 * seconds[faster])} ms {faster} vs "
                          f"{round(1000 * seconds[slower])} ms {slower} a step")


@pytest.mark.parametrize("cpu, expected", [("avx512_bf16", "float32"), ("amx", "mixed_bfloat16")])
def test_a_short_budget_is_not_measured(cpu, expected):
    calls = []
    policy, why, measured = precision_probe.choose(_fake_trainer(time_budget=6), _timer({}, calls), cpu=cpu)
    assert (policy, measured, calls) == (expected, {}, []) and "6-min budget" in why


def test_with_amx_bfloat16_is_timed_first_and_float32_kept_when_faster():
    """CPU-D (AMX), tools/bench_models.py: LR-ASPP MobileNetV3-Small at 128x256 trained at 37.7 img/s in
    float32 and 28.1 in mixed_bfloat16."""
    calls = []
    seconds = {"mixed_bfloat16": 8 / 28.1, "float32": 8 / 37.7}
    policy, why, _ = precision_probe.choose(_fake_trainer(time_budget=35), _timer(seconds, calls),
                                            log=lambda _: None, cpu="amx")
    assert (policy, calls) == ("float32", ["mixed_bfloat16", "float32"])
    assert why == "auto: measured 212 ms float32 vs 285 ms mixed_bfloat16 a step (a CPU with AMX)"
    # A fixed-length run whose bfloat16 steps make less than the minimum keeps bfloat16 unmeasured against.
    calls.clear()
    assert precision_probe.choose(_fake_trainer(fixed_steps=100), _timer(seconds, calls), log=lambda _: None,
                                  cpu="amx")[0] == "mixed_bfloat16"
    assert calls == ["mixed_bfloat16"]


@pytest.mark.parametrize("steps,expected,timed", [
    (1000, "float32", ["float32"]),  # 1000 x 0.5 s = 8.3 min: bfloat16 is not timed
    (1300, "mixed_bfloat16", ["float32", "mixed_bfloat16"]),  # 10.8 min
])
def test_a_fixed_length_run_is_measured_when_its_float32_length_pays(steps, expected, timed):
    calls = []
    policy, why, _ = precision_probe.choose(_fake_trainer(fixed_steps=steps),
                                            _timer({"float32": 0.5, "mixed_bfloat16": 0.4}, calls),
                                            log=lambda _: None, cpu="avx512_bf16")
    assert (policy, calls) == (expected, timed)


def test_several_workers_and_a_resume_do_not_measure(monkeypatch):
    calls = []
    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy", SimpleNamespace)
    workers = _fake_trainer(time_budget=35, strategy=SimpleNamespace())
    assert precision_probe.choose(workers, _timer({}, calls), cpu="avx512_bf16")[0] == "float32"
    assert precision_probe.choose(workers, _timer({}, calls), cpu="amx")[0] == "mixed_bfloat16"
    resumed = _fake_trainer(time_budget=35, resume=True, resolved={"precision": "mixed_bfloat16"})
    assert precision_probe.choose(resumed, _timer({}, calls))[:2] == (
        "mixed_bfloat16", "auto: mixed_bfloat16, as the run being resumed chose")
    assert calls == []


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
