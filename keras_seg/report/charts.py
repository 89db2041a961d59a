"""The report's charts as inline SVG: drawn here, without a plotting library.

Why not matplotlib, the field's default: Keras 3.15 imports `matplotlib.pyplot` (and mplot3d) at
`import keras` whenever matplotlib is installed (`keras.src.visualization.plot_image_gallery`),
0.8 s of every training, evaluation and serving process's start on CPU-D, so installing it would
put it on the training step's import path whatever this package does. Four chart kinds (lines,
bars, grouped bars, a heat map) are a few SVG elements each; SVG keeps the page self-contained,
sharp at any zoom, and its class names are text a browser can search.
"""

from __future__ import annotations

import html
import math

import numpy as np

# One colour per run on comparison charts (matplotlib's default cycle, so runs keep familiar colours).
RUN_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
FONT = 'font-family="Helvetica, Arial, sans-serif"'


def _svg(width, height, body) -> str:
    return (f'<svg width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" {FONT} font-size="11">{"".join(body)}</svg>')


def _text(x, y, text, anchor="start", size=11, extra="") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}"{extra}>'
            f"{html.escape(str(text))}</text>")


def _ticks(low, high, count=5) -> list:
    """Round tick values covering [low, high]."""
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw), default=raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step)) + 1)]


def _number(value) -> str:
    if value == 0:
        return "0"
    if abs(value) < 1e-2 or abs(value) >= 1e4:
        return f"{value:.1e}".replace(".0e", "e")  # 1.5e-03 and 2e-03, not 2e-03 twice
    return f"{value:g}"


def line_panel(title, series, best=None, width=900, height=190) -> str:
    """One chart: `series` [(label, colour, xs, ys)], each point marked; `best` (x, y, colour) a star."""
    left, right, top, bottom = 62, 16, 22, 28
    xs = [x for s in series for x in s[2]]
    ys = [y for s in series for y in s[3] if y is not None and not math.isnan(y)]
    body = [_text(left, 14, title, size=12, extra=' font-weight="bold"')]
    if not ys:
        return _svg(width, height, body + [_text(width / 2, height / 2, "no values", "middle")])
    x_ticks, y_ticks = _ticks(min(0, min(xs)), max(xs)), _ticks(min(ys), max(ys), 4)
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def px(x):
        return left + (x - x0) / ((x1 - x0) or 1) * (width - left - right)

    def py(y):
        return height - bottom - (y - y0) / ((y1 - y0) or 1) * (height - top - bottom)

    for t in y_ticks:
        body.append(f'<line x1="{left}" x2="{width - right}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#e4e4e4"/>')
        body.append(_text(left - 5, py(t) + 4, _number(t), "end", 10))
    for t in x_ticks:
        body.append(_text(px(t), height - bottom + 14, _number(t), "middle", 10))
    body.append(f'<line x1="{left}" x2="{width - right}" y1="{height - bottom}" y2="{height - bottom}" stroke="#888"/>')
    for label, color, sx, sy in series:
        points = [(px(x), py(y)) for x, y in zip(sx, sy) if y is not None and not math.isnan(y)]
        body.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" points="'
                    + " ".join(f"{a:.1f},{b:.1f}" for a, b in points) + '"/>')
        body += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{color}"><title>{html.escape(label)}</title></circle>'
                 for a, b in points]
    if best is not None:
        x, y, color = best
        cx, cy = px(x), py(y)
        star = " ".join(f"{cx + r * math.sin(k * math.pi / 5):.1f},{cy - r * math.cos(k * math.pi / 5):.1f}"
                        for k, r in zip(range(10), [9, 4] * 5))
        body.append(f'<polygon points="{star}" fill="{color}" stroke="black" stroke-width="0.8"/>')
        right_half = cx > width / 2  # the label on the side with room
        body.append(_text(cx + (-12 if right_half else 12), cy + 4, f"best {100 * y:.2f} at step {x}",
                          "end" if right_half else "start", 10, ' font-weight="bold"'))
    return _svg(width, height, body)


def learning_curves(runs) -> str:
    """Training loss, val mIoU and learning rate against step; `runs` [(label, history rows, best step)]."""
    charts = []
    for key, title in (("loss", "training loss (mean since the previous validation)"), ("val_miou", "val mIoU"),
                       ("learning_rate", "learning rate")):
        series = [(label, RUN_COLORS[i % len(RUN_COLORS)], [r["step"] for r in rows], [r.get(key) for r in rows])
                  for i, (label, rows, _) in enumerate(runs)]
        best = None
        if key == "val_miou" and len(runs) == 1:
            rows = [r for r in runs[0][1] if r["step"] == runs[0][2]]
            best = (rows[0]["step"], rows[0]["val_miou"], RUN_COLORS[0]) if rows else None
        charts.append(line_panel(title, series, best))
    legend = ""
    if len(runs) > 1:
        legend = "".join(f'<span style="color:{RUN_COLORS[i % len(RUN_COLORS)]}">&#9632; {html.escape(label)}</span> '
                         for i, (label, _, _) in enumerate(runs))
        legend = f"<div>{legend}</div>"
    return legend + "<br>".join(charts)


def per_class_bars(class_names, ious, colors, shares) -> str:
    """IoU per class as horizontal bars, best first, in the class's colour, with its pixel share."""
    order = sorted(range(len(class_names)), key=lambda c: 2.0 if ious[c] is None else -ious[c])  # absent last
    row, label_width, bar_width = 20, 210, 560
    height = row * len(order) + 30
    body = []
    for k, c in enumerate(order):
        y = 6 + k * row
        value = ious[c]
        color = "rgb({},{},{})".format(*[int(v) for v in colors[c]])
        body.append(_text(label_width - 6, y + 13, f"{class_names[c]} ({_share(shares, c)})", "end"))
        if value is not None:
            body.append(f'<rect x="{label_width}" y="{y + 2}" width="{value * bar_width:.1f}" height="{row - 5}" '
                        f'fill="{color}" stroke="#333" stroke-width="0.5"/>')
        body.append(_text(label_width + (value or 0) * bar_width + 4, y + 13,
                          "absent" if value is None else f"{100 * value:.1f}"))
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        x = label_width + t * bar_width
        body.append(f'<line x1="{x}" x2="{x}" y1="4" y2="{height - 22}" stroke="#ddd"/>')
        body.append(_text(x, height - 8, f"{t:g}", "middle", 10))
    body.append(_text(label_width + bar_width + 8, height - 8, "IoU", size=10))
    return _svg(label_width + bar_width + 60, height, body)


def per_class_compare(class_names, runs) -> str:
    """IoU per class, the runs' bars side by side; `runs` [(label, ious)] (None: absent)."""
    bar, label_width, bar_width = 8, 150, 600
    group = bar * len(runs) + 6
    height = group * len(class_names) + 50
    body = []
    for c, name in enumerate(class_names):
        y = 8 + c * group
        body.append(_text(label_width - 6, y + group / 2 + 1, name, "end"))
        for i, (label, ious) in enumerate(runs):
            value = ious[c] or 0.0
            body.append(f'<rect x="{label_width}" y="{y + i * bar}" width="{value * bar_width:.1f}" height="{bar - 1}" '
                        f'fill="{RUN_COLORS[i % len(RUN_COLORS)]}"><title>{html.escape(label)}: '
                        f'{"absent" if ious[c] is None else f"{100 * ious[c]:.2f}"}</title></rect>')
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        x = label_width + t * bar_width
        body.append(f'<line x1="{x}" x2="{x}" y1="4" y2="{height - 40}" stroke="#ddd"/>')
        body.append(_text(x, height - 26, f"{t:g}", "middle", 10))
    legend_x = label_width
    for i, (label, _) in enumerate(runs):
        body.append(f'<rect x="{legend_x}" y="{height - 16}" width="10" height="10" fill="{RUN_COLORS[i % 8]}"/>')
        body.append(_text(legend_x + 14, height - 7, label))
        legend_x += 24 + 7 * len(label)
    return _svg(label_width + bar_width + 40, height, body)


def confusion(cm, class_names) -> str:
    """The row-normalised confusion matrix (% of each ground-truth class's pixels), names on both axes."""
    cm = np.asarray(cm, np.float64)
    totals = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0) * 100
    n, cell, margin = len(class_names), 30, 130
    top = margin
    size = margin + n * cell + 20
    body = [_text(margin + n * cell / 2, 12, "prediction", "middle", 12, ' font-weight="bold"'),
            _text(12, top + n * cell / 2, "ground truth", "middle", 12,
                  f' font-weight="bold" transform="rotate(-90 12 {top + n * cell / 2:.0f})"')]
    for i in range(n):
        absent = "" if totals[i, 0] else " (absent)"
        body.append(_text(margin - 6, top + i * cell + cell / 2 + 4, f"{class_names[i]}{absent}", "end"))
        x = margin + i * cell + cell / 2 + 4
        body.append(_text(x, top - 6, class_names[i], "start", 11, f' transform="rotate(-60 {x:.1f} {top - 6})"'))
        for j in range(n):
            value = share[i, j]
            shade = int(255 - 2.1 * value)  # white (0%) to dark blue (100%)
            color = f"rgb({shade},{int(255 - 1.5 * value)},255)"
            body.append(f'<rect x="{margin + j * cell}" y="{top + i * cell}" width="{cell}" height="{cell}" '
                        f'fill="{color}" stroke="#eee"><title>{html.escape(class_names[i])} as '
                        f'{html.escape(class_names[j])}: {value:.2f}% ({int(cm[i, j])} px)</title></rect>')
            if value >= 1:  # readable at 19 classes: the small cells stay empty
                body.append(_text(margin + j * cell + cell / 2, top + i * cell + cell / 2 + 4, f"{value:.0f}",
                                  "middle", 10, ' fill="white"' if value > 55 else ""))
        if totals[i, 0]:
            body.append(f'<rect x="{margin + i * cell}" y="{top + i * cell}" width="{cell}" height="{cell}" '
                        'fill="none" stroke="#222" stroke-width="1.2"/>')
    return _svg(size, size, body)


def _share(shares, c) -> str:
    if shares is None:
        return "-"
    value = shares[c]
    return "0%" if value == 0 else (f"{100 * value:.2f}%" if value < 0.01 else f"{100 * value:.1f}%")
