"""The run report: one self-contained HTML page per run (RUN/report.html), and run-to-run comparisons.

    python -m keras_seg.report RUN [RUN ...] [-o FILE]

`keras_seg.report.collect` reads a run directory and scores its best model image by image,
`charts` draws with matplotlib (imported only when a report is drawn), `page` holds the HTML
pieces and `build` assembles the pages (docs/report.md describes each section).
"""

from keras_seg.report.build import write_comparison, write_evaluation_report, write_run_report
from keras_seg.report.collect import ImageScores, ReportError

__all__ = ["ImageScores", "ReportError", "write_comparison", "write_evaluation_report", "write_run_report"]
