#!/usr/bin/env python
"""Conversion throughput with 1 and 2 worker processes, side by side in one run.

    python tools/bench_make_tfrecords.py [--input ../shared/data/cityscapes_pairs] [--limit N]

Converts the Kaggle Cityscapes pairs (2,975 side-by-side JPEGs) with 1 worker, then 2, then 1
again (to see drift on a shared machine). Each conversion runs in a fresh Python process, as the
command line does, and is timed from the start of the conversion to the written
dataset_info.json (TensorFlow's import, which the converter does lazily, included; interpreter
start-up excluded). Prints images/s, the speed-up, and whether the shards are byte-identical.
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


def _one_run(input_dir, output_dir, workers, limit):
    """Runs in a child process: one conversion, prints its seconds."""
    from pipelines.cityscapes_pairs import CityscapesPairsSource
    from pipelines.convert import convert

    class Limited(CityscapesPairsSource):
        def list_samples(self, split):
            return super().list_samples(split)[:limit]

    start = time.perf_counter()
    convert(Limited(input_dir), output_dir, ["train"], workers=workers, progress=False, log=lambda _: None)
    print(f"SECONDS {time.perf_counter() - start}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = os.path.join(REPO, "..", "shared", "data", "cityscapes_pairs")
    parser.add_argument("--input", default=os.path.normpath(default))
    parser.add_argument("--limit", type=int, help="convert only the first N pairs")
    parser.add_argument("--one-run", nargs=2, metavar=("WORKERS", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_run:
        return _one_run(args.input, args.one_run[1], int(args.one_run[0]), args.limit)
    if not os.path.isdir(os.path.join(args.input, "train")):
        sys.exit(f"error: {args.input}: no train/ folder of Cityscapes pairs")
    count = len([n for n in os.listdir(os.path.join(args.input, "train")) if n.endswith(".jpg")])
    count = min(count, args.limit or count)
    print(f"{count} pairs from {args.input}, {os.cpu_count()} cores")
    speeds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run, workers in enumerate((1, 2, 1)):
            out = os.path.join(tmp, f"run{run}")
            command = [sys.executable, __file__, "--input", args.input, "--one-run", str(workers), out]
            if args.limit:
                command += ["--limit", str(args.limit)]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            seconds = float(result.stdout.split("SECONDS")[-1])
            speeds.setdefault(workers, []).append(count / seconds)
            print(f"workers={workers}: {seconds:6.1f} s  {count / seconds:7.1f} images/s")
        names = sorted(n for n in os.listdir(os.path.join(tmp, "run0")) if n.endswith(".tfrecord"))
        identical = all(
            filecmp.cmp(os.path.join(tmp, "run0", n), os.path.join(tmp, "run1", n), shallow=False) for n in names
        )
    one = sum(speeds[1]) / len(speeds[1])
    print(f"speed-up, 2 workers over 1 (mean of the two 1-worker runs): {speeds[2][0] / one:.2f}x")
    print(f"shards byte-identical between 1 and 2 workers: {identical}")


if __name__ == "__main__":
    main()
