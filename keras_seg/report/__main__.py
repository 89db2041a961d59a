"""`python -m keras_seg.report RUN [RUN ...] [-o FILE]`: a run's report, or several runs compared.

One run: its report.html again (for a run that was stopped, or made before reports existed),
written to RUN/report.html unless -o says where. Several: one comparison page (-o needed).
"""

from __future__ import annotations

import argparse
import os
import sys


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_seg.report",
        description="Rebuild a training run's report.html from its directory, or compare several runs on one page.")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories written by keras_seg.train")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="the HTML file to write (one run: default RUN/report.html; several: required)")
    parser.add_argument("--overwrite", action="store_true", help="replace FILE when it exists (RUN/report.html is "
                                                                 "always rebuilt)")
    parser.add_argument("-k", type=int, default=4, help="worst and best val images shown, each (default: 4)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for run in args.runs:
        if not os.path.exists(os.path.join(run, "config.json")):
            parser.exit(2, f"error: {run}: not a run directory (no config.json)\n")
    if len(args.runs) > 1 and not args.output:
        parser.exit(2, "error: comparing runs needs -o FILE (where the comparison page goes)\n")
    if args.output and os.path.exists(args.output) and not args.overwrite:
        parser.exit(2, f"error: -o {args.output} exists: --overwrite to replace it, or choose another\n")
    if args.output and os.path.isdir(args.output):
        parser.exit(2, f"error: -o {args.output} is a directory: give a file name such as report.html\n")
    if args.k < 0:
        parser.exit(2, f"error: -k must be >= 0, got {args.k}\n")
    from keras_seg.quiet import import_tensorflow

    import_tensorflow()
    from keras_seg.report import ReportError, write_comparison, write_run_report

    try:
        if len(args.runs) == 1:
            path = write_run_report(args.runs[0], args.output, k=args.k)
        else:
            path = write_comparison(args.runs, args.output, k=args.k)
    except (ReportError, OSError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
