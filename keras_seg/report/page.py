"""HTML pieces of the report: one self-contained file, charts as inline SVG, images as data URIs, no script.

Numbers a test or a person may want exactly are in tables (the per-class IoU, the confusion counts);
the charts draw the same numbers.
"""

from __future__ import annotations

import base64
import html
import json

import numpy as np

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px; margin: 1.5em auto;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc;
       padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ddd; padding: 2px 8px; }
th { background: #f4f4f4; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.key td:first-child { font-weight: 600; background: #fafafa; }
.note { color: #555; font-size: 0.9em; } .verdict { font-size: 1.05em; background: #f5f8ff; padding: 0.5em 0.8em;
       border-left: 4px solid #4a7bd0; }
.bar { display: flex; height: 22px; width: 100%; border: 1px solid #aaa; margin: 0.5em 0; }
.bar div { height: 100%; } figure { margin: 0.6em 0; } figcaption { font-size: 0.9em; color: #333; }
img, svg { max-width: 100%; height: auto; }  /* charts shrink with a narrow window, as pictures do */
pre { font-size: 0.8em; background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
.pos { color: #17803d; } .neg { color: #c0392b; }
"""
TIME_COLORS = {"start_up_seconds": "#9e9e9e", "step_seconds": "#4a7bd0", "validation_seconds": "#f0a030",
               "checkpoint_seconds": "#7b4fb0", "final_phase_seconds": "#3a9a5b"}
TIME_NAMES = {"start_up_seconds": "start-up (imports, data, model, first trace)",
              "step_seconds": "training steps (input wait included: the input is read inside the compiled step)",
              "validation_seconds": "validation (with its files, summaries, best-model save)",
              "checkpoint_seconds": "checkpoints",
              "final_phase_seconds": "final phase (last model, samples, export)"}


def esc(value) -> str:
    return html.escape(str(value))


def png_tag(png: bytes, alt: str, width=None) -> str:
    data = base64.b64encode(png).decode("ascii")
    size = f' width="{width}"' if width else ""
    return f'<img alt="{esc(alt)}"{size} src="data:image/png;base64,{data}">'


def figure(svg) -> str:
    return f'<figure class="chart">{svg}</figure>'


def rgb_png(rgb) -> bytes:
    import cv2

    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(np.asarray(rgb, np.uint8)[..., ::-1]))
    if not ok:
        raise ValueError("could not encode a PNG")
    return encoded.tobytes()


def percent(value, digits=2) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{100 * value:.{digits}f}"


def key_table(rows) -> str:
    body = "".join(f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="key">{body}</table>'


def document(title, body) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def per_class_table(class_names, ious, shares=None, table_id="per-class-iou") -> str:
    rows = []
    for c, name in enumerate(class_names):
        share = "" if shares is None else f'<td class="num">{percent(shares[c])}</td>'
        value = "" if ious[c] is None else f"{ious[c]:.6f}"
        rows.append(f'<tr><td>{c}</td><td>{esc(name)}</td><td class="num" data-iou="{value}">{percent(ious[c])}</td>'
                    f"{share}</tr>")
    head = "<th>share of val pixels, %</th>" if shares is not None else ""
    return (f'<details><summary>the numbers</summary><table id="{table_id}"><tr><th>id</th><th>class</th>'
            f"<th>IoU, %</th>{head}</tr>{''.join(rows)}</table></details>")


def confusion_table(cm, class_names) -> str:
    """The confusion counts (rows: ground truth), collapsed: what the chart's percentages come from."""
    cm = np.asarray(cm, np.int64)
    head = "".join(f"<th>{c}</th>" for c in range(len(class_names)))
    rows = "".join(f"<tr><th>{c} {esc(name)}</th>" + "".join(f'<td class="num">{v}</td>' for v in cm[c]) + "</tr>"
                   for c, name in enumerate(class_names))
    return (f'<details><summary>pixel counts (rows: ground truth, columns: prediction)</summary>'
            f'<table id="confusion-counts"><tr><th></th>{head}</tr>{rows}</table></details>')


def time_section(timing) -> str:
    if not timing:
        return '<p class="note">No timing.json: this run was made before the trainer recorded where its time went.</p>'
    parts = [(k, float(timing[k])) for k in TIME_NAMES if timing.get(k) is not None]
    total = sum(v for _, v in parts) or 1.0
    bar = "".join(f'<div title="{esc(TIME_NAMES[k])}" style="width:{100 * v / total:.2f}%;background:'
                  f'{TIME_COLORS[k]}"></div>' for k, v in parts)
    rows = "".join(f'<tr><td><span style="color:{TIME_COLORS[k]}">&#9632;</span> {esc(TIME_NAMES[k])}</td>'
                   f'<td class="num">{v:.1f}</td><td class="num">{100 * v / total:.1f}</td></tr>' for k, v in parts)
    counts = esc(f"{timing.get('steps', 0)} steps, {timing.get('validations', 0)} validations")
    return (f'<div class="bar">{bar}</div><table><tr><th>where</th><th>seconds</th><th>%</th></tr>{rows}'
            f'<tr><th>this process, in all ({counts})</th><td class="num">{total:.1f}</td><td></td></tr></table>'
            '<p class="note">From timing.json, written by the trainer at each checkpoint and at the end (this '
            "process only: a resumed run counts from its resume). The report itself is not counted.</p>")


def config_section(config) -> str:
    text = json.dumps(config, indent=2, sort_keys=False, default=str)
    return f"<details><summary>config.json (the full resolved configuration)</summary><pre>{esc(text)}</pre></details>"


def sample_panel(image, mask, prediction, class_colors, ignore_index=255) -> np.ndarray:
    """image | ground truth | prediction | errors (wrong pixels red on the dimmed photo; ignored: grey)."""
    from keras_seg import visualize

    image = np.asarray(image, np.uint8)
    wrong = (prediction != mask) & (mask != ignore_index)
    errors = (image.astype(np.float32) * 0.35 + 255 * 0.65 * 0.6).astype(np.uint8)
    errors[wrong] = (230, 30, 30)
    errors[mask == ignore_index] = (128, 128, 128)
    return visualize.panel([image, visualize.colorize(mask, class_colors), visualize.colorize(prediction,
                                                                                               class_colors), errors])


def delta(value) -> str:
    if value is None:
        return "-"
    return f'<span class="{"pos" if value > 0 else "neg" if value < 0 else ""}">{100 * value:+.2f}</span>'
