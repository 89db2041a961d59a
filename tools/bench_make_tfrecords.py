#!/usr/bin/env python
"""Conversion throughput with 1 and 2 worker processes, side by side in one run.

    python tools/bench_make_tfrecords.py [--input ../shared/data/cityscapes_pairs] [--limit N] [--rounds R]

Reads every input file once (so that no run pays for a cold disk cache), then converts the Kaggle
Cityscapes pairs (2,975 side-by-side JPEGs) with 1, 2, 1, 2, ... workers (alternating, so that drift
on a shared machine touches both alike). Each conversion runs in a fresh Python process, as the
command line does, timed from the call of `convert` to the written dataset_info.json (everything
the conversion does, the colour table included; the interpreter's start-up and imports excluded,
and reported apart). Prints images/s, the speed-up of the mean 2-worker rate over the mean
1-worker rate, whether the shards are byte-identical, and that TensorFlow was never imported.
"""

import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pipelines.cityscapes_pairs import CityscapesPairsSource  # noqa: E402 - no TensorFlow behind it


class FirstPairs(CityscapesPairsSource):
    """The pairs source limited to the first `limit` files (module level: workers unpickle it)."""

    limit = None

    def list_samples(self, split):
        return super().list_samples(split)[: self.limit]


def _one_run(input_dir, output_dir, workers, limit):
    """Runs in a child process: one conversion, prints its seconds."""
    from pipelines.convert import convert

    source = FirstPairs(input_dir)
    source.limit = limit
    start = time.perf_counter()
    convert(source, output_dir, ["train"], workers=workers, progress=False, log=lambda _: None)
    print(f"SECONDS {time.perf_counter() - start}")
    print(f"TENSORFLOW {'tensorflow' in sys.modules}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = os.path.join(REPO, "..", "shared", "data", "cityscapes_pairs")
    parser.add_argument("--input", default=os.path.normpath(default))
    parser.add_argument("--limit", type=int, help="convert only the first N pairs")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each worker count")
    parser.add_argument("--one-run", nargs=2, metavar=("WORKERS", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_run:
        return _one_run(args.input, args.one_run[1], int(args.one_run[0]), args.limit)
    if not os.path.isdir(os.path.join(args.input, "train")):
        sys.exit(f"error: {args.input}: no train/ folder of Cityscapes pairs")
    count = len([n for n in os.listdir(os.path.join(args.input, "train")) if n.endswith(".jpg")])
    count = min(count, args.limit or count)
    for name in sorted(os.listdir(os.path.join(args.input, "train")))[:count]:
        with open(os.path.join(args.input, "train", name), "rb") as f:
            f.read()
    print(f"{count} pairs from {args.input}, {os.cpu_count()} cores")
    speeds, tensorflow_imported = {}, False
    with tempfile.TemporaryDirectory() as tmp:
        for run, workers in enumerate((1, 2) * args.rounds):
            out = os.path.join(tmp, f"run{run}")
            command = [sys.executable, __file__, "--input", args.input, "--one-run", str(workers), out]
            if args.limit:
                command += ["--limit", str(args.limit)]
            start = time.perf_counter()
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            process_seconds = time.perf_counter() - start
            seconds = float(result.stdout.split("SECONDS")[-1].split()[0])
            tensorflow_imported |= result.stdout.split("TENSORFLOW")[-1].split()[0] == "True"
            speeds.setdefault(workers, []).append(count / seconds)
            print(f"workers={workers}: {seconds:6.2f} s  {count / seconds:7.1f} images/s"
                  f"   (whole process, start-up and imports included: {process_seconds:6.2f} s)")
        names = sorted(n for n in os.listdir(os.path.join(tmp, "run0")) if n.endswith(".tfrecord"))
        identical = all(
            filecmp.cmp(os.path.join(tmp, "run0", n), os.path.join(tmp, "run1", n), shallow=False) for n in names
        )
    one, two = (sum(speeds[w]) / len(speeds[w]) for w in (1, 2))
    print(f"speed-up, 2 workers over 1 (mean images/s of {args.rounds} runs each): {two / one:.2f}x")
    print(f"shards byte-identical between 1 and 2 workers: {identical}")
    print(f"TensorFlow imported by a conversion: {tensorflow_imported}")


if __name__ == "__main__":
    main()
