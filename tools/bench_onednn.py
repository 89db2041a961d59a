"""TensorFlow's oneDNN kernels off and on for the trainer's real step: an A/B in two processes on this CPU.

TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, when it is imported, so each setting runs in a child
process of its own with the variable set before anything imports TensorFlow: 0 (oneDNN off:
TensorFlow's Eigen kernels) and 1 (oneDNN on, keras-seg's default since it sets the variable where
the user has not). The processes alternate over rounds (round 1 off then on, round 2 on then off,
...), so that slow drift of the machine's load falls on both settings alike. In each process, each
config's real step (`keras_seg.training.bench.FixedBatchStep`: the preset's model, augmentation,
loss, class weights, confusion matrix, optimizer with the trainer's clipping and schedule, on one
random batch, float32) takes a warm-up call (it traces and compiles), then `--steps` timed steps in
calls of `--steps-per-call` (the trainer runs `steps_per_call` = 10 steps in a call). Configs:

  unet_silu-demo  the default command's step (`python -m keras_seg.train --preset unet_silu`
                  without --data: 64x128, 16 base filters, batch 16, CE)
  unet_small      `--preset unet_small --data DIR`: 128x256, batch 8, CE + Dice with ENet weights

    python tools/bench_onednn.py                  # 2 rounds x 2 settings: 5 minutes on a shared 2-core machine
    python tools/bench_onednn.py --rounds 1 --steps 2 --steps-per-call 2 --warmup 1   # a smoke check: 1 minute
    python tools/bench_onednn.py --isa avx2       # oneDNN limited to AVX2

It prints the CPU (lscpu's model name, family and model, and the flags TensorFlow's kernels
depend on), what TensorFlow chooses by itself on this CPU (`IsMklEnabled()` in a process where the
variable is unset and keras_seg is not imported: TF 2.21 turns oneDNN on only with AVX512_VNNI,
AVX512_BF16, AVX_VNNI or AMX), the instruction set oneDNN uses in each arm (from ONEDNN_VERBOSE),
then per config and setting the median ms a step, img/s and the spread (min - max of the timed
calls, all rounds), each round's median, and the ratio of img/s (on / off): above 1, oneDNN is
the faster.

`--isa avx2` sets ONEDNN_MAX_CPU_ISA=AVX2: a stand-in for the oneDNN kernels of a CPU with AVX2
only (AMD Zen 3, older Intel), not for such a CPU. By default it applies to both arms, because
with oneDNN off TensorFlow's Eigen matrix products (convolutions included) still call oneDNN's
sgemm (ONEDNN_VERBOSE shows `gemm_api` there); `--isa-arms onednn` limits the oneDNN arm only.
Eigen's own kernels (batch norm, activations, pooling, the augmentation's and the loss's
elementwise work: built for AVX in TensorFlow's wheel) are not restricted by it, in either arm.

Timings on a machine shared with other work vary with that work: the load average is printed
before and after; compare only the ratio of one run, and take figures on a quiet machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SETTINGS = {"0": "oneDNN off (Eigen)", "1": "oneDNN on"}
# name -> (preset, its demo settings, the train command's overrides)
CONFIGS = {
    "unet_silu-demo": ("unet_silu", True, ["--precision", "float32"]),
    "unet_small": ("unet_small", False, ["--precision", "float32"]),
}
ISAS = {"avx2": "AVX2", "avx512_core": "AVX512_CORE"}

# A process where TF_ENABLE_ONEDNN_OPTS may be unset: TensorFlow alone (keras_seg's import would set
# it), one convolution and one matrix product so that ONEDNN_VERBOSE names the ISA and the kernels.
PROBE = """
import json
from tensorflow.python.util import _pywrap_util_port
import tensorflow as tf
x = tf.random.normal((2, 32, 32, 16))
float(tf.reduce_sum(tf.nn.conv2d(x, tf.random.normal((3, 3, 16, 16)), 1, "SAME")))
float(tf.reduce_sum(tf.matmul(tf.random.normal((64, 64)), tf.random.normal((64, 64)))))
print("PROBE " + json.dumps({"enabled": bool(_pywrap_util_port.IsMklEnabled())}))
"""


def load_profile_step():
    """tools/profile_step.py: the real step's helpers (it imports no TensorFlow until they are called)."""
    spec = importlib.util.spec_from_file_location("keras_seg_tools_profile_step", os.path.join(HERE, "profile_step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- a child: one setting


def child(args):
    """Times every config's real step in this process (its oneDNN setting is the environment's);
    prints one line of JSON."""
    profile_step = load_profile_step()
    configs = {name: profile_step.step_config(preset, demo, overrides)
               for name, (preset, demo, overrides) in CONFIGS.items() if name in args.configs}
    from keras_seg import quiet
    from keras_seg.distribute import onednn_state

    results = {}
    with quiet.native_stderr_filtered_while_running():
        for name, config in configs.items():
            step = profile_step.real_step(config)
            loss = step(args.warmup)  # the first call traces and compiles
            seconds, done = [], 0
            while done < args.steps:
                n = min(args.steps_per_call, args.steps - done)
                started = time.perf_counter()
                loss = step(n)  # a float: the steps have finished
                seconds.append((time.perf_counter() - started) / n)
                done += n
            results[name] = {"batch": config.batch_size, "seconds": seconds, "loss": loss}
            del step
    print("RESULT " + json.dumps({"onednn": onednn_state(), "results": results}))


# --------------------------------------------------------------------------- the parent


def child_environment(onednn, args, unset=False):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    if not unset:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    if args.isa and (args.isa_arms == "both" or onednn == "1") and not unset:
        env["ONEDNN_MAX_CPU_ISA"] = ISAS[args.isa]
    return env


def run_child(command, env, what):
    """The child's stdout; its stderr's end and exit 1 if it failed."""
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-3000:])
        sys.exit(f"bench_onednn.py: {what} failed (exit {result.returncode})")
    return result.stdout


def probe(onednn, args, unset=False):
    """{"enabled": IsMklEnabled(), "isa": oneDNN's ISA, "kernels": the convolution's and gemm's implementations}."""
    env = dict(child_environment(onednn, args, unset), ONEDNN_VERBOSE="1")
    stdout = run_child([sys.executable, "-c", PROBE], env, "the oneDNN probe")
    state = json.loads(next(line for line in stdout.splitlines() if line.startswith("PROBE "))[6:])
    state["isa"] = next((line.split("isa:", 1)[1].strip() for line in stdout.splitlines()
                         if line.startswith("onednn_verbose") and ",isa:" in line), "not reported")
    kernels = []
    for line in stdout.splitlines():
        fields = line.split(",")
        if line.startswith("onednn_verbose") and "exec" in fields and fields[fields.index("exec") + 2] != "reorder":
            kernel = f"{fields[fields.index('exec') + 2]} {fields[fields.index('exec') + 3]}".strip()
            if kernel not in kernels:
                kernels.append(kernel)
    state["kernels"] = kernels
    return state


def time_setting(onednn, args):
    command = [sys.executable, os.path.abspath(__file__), "--child", "--configs", *args.configs,
               "--steps", str(args.steps), "--steps-per-call", str(args.steps_per_call), "--warmup", str(args.warmup)]
    stdout = run_child(command, child_environment(onednn, args), f"the child with TF_ENABLE_ONEDNN_OPTS={onednn}")
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])


def print_header(args, profile_step):
    print(profile_step.cpu_description())
    default = probe(None, args, unset=True)
    print(f"TensorFlow's own choice here (TF_ENABLE_ONEDNN_OPTS unset, keras_seg not imported): oneDNN "
          f"{'on' if default['enabled'] else 'off'}")
    for onednn, name in SETTINGS.items():
        state = probe(onednn, args)
        limit = child_environment(onednn, args).get("ONEDNN_MAX_CPU_ISA")
        print(f"  {name}: IsMklEnabled {state['enabled']}; oneDNN's ISA: {state['isa']}"
              f"{f' (ONEDNN_MAX_CPU_ISA={limit})' if limit else ''}; a convolution and a matmul ran "
              f"{', '.join(state['kernels']) or 'no oneDNN kernel'}")
    if args.isa:
        print(f"--isa {args.isa}: ONEDNN_MAX_CPU_ISA limits oneDNN's kernels only ("
              f"{'both arms' if args.isa_arms == 'both' else 'the oneDNN arm'}); Eigen's own kernels (batch norm, "
              "activations, pooling, elementwise work) are NOT restricted by it: a stand-in for an AVX2-only CPU's "
              "oneDNN kernels, not for that CPU")


def summarize(runs, args):
    """Per config and setting: median ms a step over every timed call, spread, img/s, each round's
    median; and the ratio of img/s, on / off."""
    print(f"\n{'config':<16}{'setting':<20}{'ms/step':>9}{'img/s':>8}   {'min - max ms':<14}rounds' medians ms")
    for name in args.configs:
        throughput = {}
        for onednn, setting in SETTINGS.items():
            rounds = [run["results"][name]["seconds"] for run in runs[onednn]]
            samples = [s for r in rounds for s in r]
            batch = runs[onednn][0]["results"][name]["batch"]
            median = statistics.median(samples)
            throughput[onednn] = batch / median
            spread = f"{1000 * min(samples):.0f} - {1000 * max(samples):.0f}"
            per_round = " / ".join(f"{1000 * statistics.median(r):.0f}" for r in rounds)
            print(f"{name:<16}{setting:<20}{1000 * median:>9.0f}{batch / median:>8.1f}   {spread:<14}{per_round}")
        print(f"{name:<16}{'on / off img/s':<20}{throughput['1'] / throughput['0']:>17.2f}x")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of one process per setting (default 2)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per config per process")
    parser.add_argument("--steps-per-call", type=int, default=5, help="steps in one call of the compiled loop")
    parser.add_argument("--warmup", type=int, default=5, help="steps of the untimed first call, which compiles")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), metavar="CONFIG",
                        help=f"any of: {', '.join(repr(name) for name in CONFIGS)} (default both)")
    parser.add_argument("--isa", choices=list(ISAS), help="ONEDNN_MAX_CPU_ISA: limit oneDNN's instruction set")
    parser.add_argument("--isa-arms", choices=("both", "onednn"), default="both",
                        help="where --isa applies: both processes (the Eigen arm's matrix products call oneDNN's "
                             "sgemm) or the oneDNN arm only")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("rounds", "steps", "steps_per_call", "warmup"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.isa_arms != "both" and not args.isa:
        parser.error("--isa-arms needs --isa")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child(args)
    profile_step = load_profile_step()
    started = time.perf_counter()
    print_header(args, profile_step)
    print(f"float32; rounds {args.rounds} x {len(SETTINGS)} processes, alternating; in each process, per config a "
          f"warm-up call (steps: {args.warmup}), then {args.steps} timed steps in calls of {args.steps_per_call}")
    print(f"{profile_step.load_average()} (before)")
    runs = {onednn: [] for onednn in SETTINGS}
    for round_index in range(args.rounds):
        order = list(SETTINGS) if round_index % 2 == 0 else list(reversed(SETTINGS))
        for onednn in order:
            run = time_setting(onednn, args)
            if run["onednn"]["enabled"] != (onednn == "1"):
                sys.exit(f"bench_onednn.py: the child with TF_ENABLE_ONEDNN_OPTS={onednn} reports oneDNN "
                         f"{'on' if run['onednn']['enabled'] else 'off'}")
            runs[onednn].append(run)
            figures = ", ".join(f"{name} {1000 * statistics.median(result['seconds']):.0f} ms/step"
                                for name, result in run["results"].items())
            print(f"round {round_index + 1}, {SETTINGS[onednn]}: {figures}", flush=True)
    summarize(runs, args)
    print(f"\n{profile_step.load_average()} (after); {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
