"""The three pages: one run, runs compared, and what `evaluate` scored."""

from __future__ import annotations

import datetime
import os

import numpy as np

import keras_seg.report.charts as charts
import keras_seg.report.page as P
from keras_seg.report.collect import load_run, pixel_shares, score_run


def write_run_report(root, output=None, k=4, scored=None, limit=0) -> str:
    """RUN/report.html (or `output`) from a run directory; returns its path. `scored`: (summary,
    ImageScores) of best.keras on the val split, already computed (the trainer's final validation);
    else it is scored here (`limit`: its first images only)."""
    run = load_run(root)
    summary, scores = scored if scored is not None else score_run(run, k, limit=limit)
    html = P.document(f"{run.label}: run report", run_body(run, summary, scores))
    return _write(output or os.path.join(root, "report.html"), html)


def write_comparison(roots, output, k=3) -> str:
    """One page comparing runs: curves overlaid, per-class IoU side by side with deltas, the same val images."""
    runs = [load_run(root) for root in roots]
    labels = _unique_labels(runs)
    first_summary, first_scores = score_run(runs[0], k)
    indices = []
    if first_summary is not None:
        indices = [i for which in ("worst", "best") for i, _, _ in first_scores.ranked(which)]
    scored = [(first_summary, first_scores)] + [score_run(run, 0, keep=indices) for run in runs[1:]]
    html = P.document("run comparison", comparison_body(runs, labels, scored, indices, first_scores))
    return _write(output, html)


def write_evaluation_report(output, summary, scores, class_names, class_colors, settings, ignore_index=255) -> str:
    """The per-class chart, confusion matrix and worst/best images of one `evaluate` run."""
    title = f"{settings['model']} on {settings['data']} {settings['split']} ({settings['mode']})"
    parts = [f"<h1>Evaluation: {P.esc(title)}</h1>",
             P.key_table([("model", P.esc(settings["model"])), ("data", P.esc(settings["data"])),
                          ("split", f"{P.esc(settings['split'])}, {summary['images']} images"),
                          ("inference", P.esc(settings.get("inference"))), ("mode", P.esc(settings["mode"])),
                          ("mIoU", f"<b>{P.percent(summary['miou'])}</b>"),
                          ("pixel accuracy", P.percent(summary["pixel_accuracy"]))]
                         + ([("category mIoU", P.percent(summary["category_miou"]))]
                            if "category_miou" in summary else []))]
    parts += _scored_sections(summary, scores, class_names, class_colors, ignore_index)
    return _write(output, P.document(f"evaluation: {title}", "\n".join(parts)))


# ----------------------------------------------------------------------- one run


def run_body(run, summary, scores) -> str:
    config, resolved, info = run.config, run.config.get("resolved", {}), run.info
    splits = ", ".join(f"{name} {s.get('num_examples', '?')} images" for name, s in info.get("splits", {}).items())
    best = run.best
    best_text = P.esc(run.best_note) if run.best_note else "no validation yet"
    if best:
        best_text = (f"<b>{P.percent(best['miou'])}</b> mIoU ({len(run.class_names)} classes) at step "
                     f"{P.esc(best['step'])}")
        if best.get("category_miou") is not None:
            best_text += f"; category mIoU {P.percent(best['category_miou'])} (Cityscapes' 7 categories)"
    last_step = run.history[-1]["step"] if run.history else None
    planned = resolved.get("total_steps")
    steps = f"{last_step if last_step is not None else 0} validated of {planned} planned" if planned else str(last_step)
    budget = f"{config['time_budget']:g} min" if config.get("time_budget") else "none (fixed length)"
    wall = "-"
    if run.timing:
        wall = f"{sum(float(run.timing.get(k) or 0) for k in P.TIME_NAMES) / 60:.1f} min (this process)"
    provenance = config.get("provenance", {})
    parts = [f"<h1>{P.esc(run.label)}: {P.esc(config.get('preset'))}</h1>",
             f'<p class="note">{P.esc(os.path.abspath(run.root))}; started {P.esc(provenance.get("started", "?"))} '
             f"on {P.esc(provenance.get('host', '?'))}; report written "
             f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}</p>",
             P.key_table([
                 ("preset", P.esc(config.get("preset")) + (f" + recipe {P.esc(config['recipe'])}"
                                                          if config.get("recipe") else "")),
                 ("data", f"{P.esc(config.get('data'))} ({P.esc(info.get('source', '?'))}, "
                          f"{P.esc(info.get('num_classes'))} classes): {P.esc(splits)}"),
                 ("precision, device", P.esc(f"{resolved.get('precision', '?')}, strategy "
                                             f"{resolved.get('strategy', '?')} x{resolved.get('replicas', '?')} "
                                             f"replicas, global batch {resolved.get('global_batch_size', '?')}")),
                 ("steps", P.esc(steps)), ("wall time", P.esc(wall)), ("time budget", P.esc(budget)),
                 ("best", best_text)]),
             "<h2>Did it converge?</h2>", f'<p class="verdict">{P.esc(convergence(run))}</p>']
    if run.history:
        parts.append(P.figure(charts.learning_curves([(run.label, run.history, run.best_step)])))
    else:
        parts.append('<p class="note">history.csv has no validation yet: no curves.</p>')
    parts.append("<h2>Which classes fail?</h2>")
    if best:
        ious = best["per_class_iou"]
        shares = pixel_shares(summary["confusion_matrix"]) if summary is not None else None
        parts.append(f'<p class="note">Per-class IoU of the best validation (step {P.esc(best["step"])}, '
                     "best_metrics.json), best first, in each class's colour; beside each name its share of the "
                     "val pixels.</p>")
        parts.append(P.figure(charts.per_class_bars(run.class_names, ious, run.class_colors, shares)))
        parts.append(P.per_class_table(run.class_names, ious, shares))
    else:
        parts.append(f'<p class="note">{P.esc(run.best_note) if run.best_note else "No validation yet"}: no '
                     'per-class IoU.</p>')
    if summary is None:
        parts.append(f'<p class="note">Confusion matrix and sample images: {P.esc(scores)}.</p>')
    else:
        note = (f"best.keras scored on the val split ({summary['images']} images, by its inference "
                f"contract): mIoU {P.percent(summary['miou'])}")
        if best and abs(summary["miou"] - best["miou"]) > 5e-4:
            note += f" (the validation at step {P.esc(best['step'])} measured {P.percent(best['miou'])})"
        parts.append(f'<p class="note">{note}.</p>')
        parts += _scored_sections(summary, scores, run.class_names, run.class_colors,
                                  run.info.get("ignore_index", 255), per_class=False)
    parts += ["<h2>Where did the time go?</h2>", P.time_section(run.timing),
              "<h2>Configuration</h2>", P.config_section(config)]
    return "\n".join(parts)


def convergence(run) -> str:
    """One sentence: still improving at the end, or flat, from history.csv."""
    rows = [r for r in run.history if "val_miou" in r]
    if not rows:
        return "No validation yet: nothing to say about convergence."
    best = max(rows, key=lambda r: r["val_miou"])
    last = rows[-1]
    third = rows[-max(2, len(rows) // 3):]
    gain = third[-1]["val_miou"] - third[0]["val_miou"]
    span = f"from step {third[0]['step']} to {third[-1]['step']}"
    if len(rows) == 1:
        return f"One validation only (step {last['step']}, val mIoU {P.percent(last['val_miou'])}): too early to tell."
    if best is last and gain > 0.005:
        return (f"Still improving when it ended: the best val mIoU is the last one (step {last['step']}), "
                f"{100 * gain:+.2f} points {span}. A longer run would likely score higher.")
    if best is last:
        return (f"Best at the last validation (step {last['step']}), but only {100 * gain:+.2f} points {span}: "
                "levelling off.")
    return (f"Best at step {best['step']} of {last['step']} ({P.percent(best['val_miou'])}); the last validation gave "
            f"{P.percent(last['val_miou'])} ({100 * gain:+.2f} points {span}): it had stopped improving.")


def _scored_sections(summary, scores, class_names, class_colors, ignore_index, per_class=True) -> list:
    cm = summary["confusion_matrix"]
    parts = []
    if per_class:
        shares = pixel_shares(cm)
        parts += ["<h2>Which classes fail?</h2>",
                  P.figure(charts.per_class_bars(class_names, _none_for_nan(summary["per_class_iou"]), class_colors,
                                                  shares)),
                  P.per_class_table(class_names, _none_for_nan(summary["per_class_iou"]), shares)]
    parts += ["<h3>Confused with what?</h3>",
              '<p class="note">Each row is a ground-truth class: where its pixels went, in %. The diagonal is the '
              "class's accuracy; off the diagonal, what it is mistaken for.</p>",
              P.figure(charts.confusion(cm, class_names)), P.confusion_table(cm, class_names),
              "<h2>Where does it go wrong in the image?</h2>",
              '<p class="note">image | ground truth | prediction | errors (wrong pixels red; ignored pixels grey). '
              f"Per-image mIoU over the classes in the image or its prediction; median over "
              f"{len(scores.scores)} images {P.percent(float(np.nanmedian(scores.scores)))}.</p>"]
    for which in ("worst", "best"):
        parts.append(f"<h3>The {len(scores.ranked(which))} {which} val images</h3>")
        for index, score, (image, mask, prediction) in scores.ranked(which):
            panel = P.sample_panel(image, mask, prediction, class_colors, ignore_index)
            parts.append(f'<figure>{P.png_tag(P.rgb_png(panel), f"val image {index}")}<figcaption>val image {index}: '
                         f"mIoU {P.percent(score)}</figcaption></figure>")
    return parts


# ----------------------------------------------------------------------- comparison


def comparison_body(runs, labels, scored, indices, first_scores) -> str:
    names = runs[0].class_names
    rows = []
    for run, label in zip(runs, labels):
        best = run.best or {}
        wall = sum(float(run.timing.get(k) or 0) for k in P.TIME_NAMES) / 60 if run.timing else None
        rows.append(f"<tr><td>{P.esc(label)}</td><td>{P.esc(run.config.get('preset'))}</td>"
                    f"<td>{P.esc(run.config.get('resolved', {}).get('precision', '?'))}</td>"
                    f'<td class="num">{run.history[-1]["step"] if run.history else 0}</td>'
                    f'<td class="num">{"-" if wall is None else f"{wall:.1f}"}</td>'
                    f'<td class="num"><b>{P.percent(best.get("miou"))}</b></td>'
                    f'<td class="num">{P.esc(best.get("step", "-"))}</td>'
                    f"<td>{P.esc(os.path.abspath(run.root))}</td></tr>")
    parts = ["<h1>Run comparison</h1>",
             "<table><tr><th>run</th><th>preset</th><th>precision</th><th>steps</th><th>wall min</th>"
             f"<th>best mIoU, %</th><th>at step</th><th>directory</th></tr>{''.join(rows)}</table>",
             f'<p class="note">Deltas are against {P.esc(labels[0])}, the first run given.</p>',
             "<h2>Learning curves</h2>",
             P.figure(charts.learning_curves([(label, run.history, run.best_step)
                                               for run, label in zip(runs, labels)]))]
    same_classes = all(run.class_names == names for run in runs)
    parts.append("<h2>Per-class IoU</h2>")
    if not same_classes:
        parts.append('<p class="note">The runs have different label spaces: per-class IoU is not compared.</p>')
    elif all(run.best for run in runs):
        per_run = [run.best["per_class_iou"] for run in runs]
        parts.append(P.figure(charts.per_class_compare(names, list(zip(labels, per_run)))))
        head = "".join(f"<th>{P.esc(label)}</th>" for label in labels) + "".join(
            f"<th>{P.esc(label)} - {P.esc(labels[0])}</th>" for label in labels[1:])
        body = []
        for c, name in enumerate(names):
            values = [ious[c] for ious in per_run]
            deltas = [None if v is None or values[0] is None else v - values[0] for v in values[1:]]
            body.append(f"<tr><td>{P.esc(name)}</td>" + "".join(f'<td class="num">{P.percent(v)}</td>' for v in values)
                        + "".join(f'<td class="num">{P.delta(d)}</td>' for d in deltas) + "</tr>")
        parts.append(f'<table id="per-class-compare"><tr><th>class (IoU, %)</th>{head}</tr>{"".join(body)}</table>')
    else:
        missing = ", ".join(label for run, label in zip(runs, labels) if not run.best)
        parts.append(f'<p class="note">No validation yet in {P.esc(missing)}: per-class IoU is not compared.</p>')
    parts.append("<h2>The same val images</h2>")
    if not indices or not same_classes:
        why = scored[0][1] if scored[0][0] is None else "the runs have different label spaces"
        parts.append(f'<p class="note">Not shown: {P.esc(why)}.</p>')
        return "\n".join(parts)
    from keras_seg import visualize

    parts.append(f'<p class="note">The {P.esc(labels[0])} run\'s worst and best val images: image | ground truth | '
                 f"each run's prediction ({', '.join(P.esc(label) for label in labels)}), with per-image mIoU.</p>")
    first = {i: (score, item) for which in ("worst", "best") for i, score, item in first_scores.ranked(which)}
    for index in indices:
        score, (image, mask, prediction) = first[index]
        columns, captions = [image, visualize.colorize(mask, runs[0].class_colors),
                             visualize.colorize(prediction, runs[0].class_colors)], [f"{labels[0]} {P.percent(score)}"]
        for (summary, scores), label, run in zip(scored[1:], labels[1:], runs[1:]):
            if summary is None or index not in scores.kept:
                captions.append(f"{label}: not scored")
                continue
            columns.append(visualize.colorize(scores.kept[index][2], run.class_colors))
            captions.append(f"{label} {P.percent(scores.scores[index])}")
        panel = visualize.panel(columns)
        parts.append(f'<figure>{P.png_tag(P.rgb_png(panel), f"val image {index}")}<figcaption>val image {index}: '
                     f"mIoU {P.esc(', '.join(captions))}</figcaption></figure>")
    return "\n".join(parts)


def _unique_labels(runs) -> list:
    labels = []
    for run in runs:
        label, n = run.label, 2
        while label in labels:
            label, n = f"{run.label}-{n}", n + 1
        labels.append(label)
    return labels


def _none_for_nan(values) -> list:
    return [None if v is None or np.isnan(v) else float(v) for v in values]


def _write(path, html) -> str:
    from keras_seg.files import write_text_atomically

    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    write_text_atomically(path, html)
    return path
