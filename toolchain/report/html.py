"""Render the build report as one self-contained HTML file (inline CSS and SVG, no scripts, no network).

A report is opened from a laptop, a CI artifact store or an air-gapped lab, so nothing in it may
reach out: the charts are SVG drawn here, and every value is escaped.
"""

from __future__ import annotations

from html import escape
from typing import Any

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1b1f24;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #d0d7de;padding-bottom:.3rem}
table{border-collapse:collapse;width:100%;margin:.5rem 0}th,td{border:1px solid #d0d7de;padding:.35rem .55rem;text-align:right}
th{background:#f6f8fa}td:first-child,th:first-child{text-align:left}.muted{color:#57606a}
td:last-child{text-align:left}.ship{background:#dafbe1}.reject{color:#9a2b2b}.ok{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}
.charts{display:flex;flex-wrap:wrap;gap:1rem}.chart{border:1px solid #d0d7de;border-radius:6px;padding:.5rem}
code{background:#f6f8fa;padding:.1rem .3rem;border-radius:4px}
"""

BAR_COLORS = {"fp32": "#57606a", "fp16": "#8250df", "mixed": "#1a7f37", "int8": "#0969da"}


def bar_chart(title: str, unit: str, rows: list[tuple[str, str, float]], chart_id: str) -> str:
    """Horizontal bars: (label, precision, value)."""
    width, bar_h, gap, label_w = 420, 22, 10, 130
    height = 30 + len(rows) * (bar_h + gap)
    top = max((v for _, _, v in rows), default=1.0) or 1.0
    parts = [f'<svg id="{chart_id}" class="chart" role="img" aria-label="{escape(title)}" width="{width}" height="{height}" '
             f'xmlns="http://www.w3.org/2000/svg"><text x="4" y="16" font-weight="600">{escape(title)}</text>']
    for i, (label, precision, value) in enumerate(rows):
        y = 28 + i * (bar_h + gap)
        length = (width - label_w - 90) * value / top
        parts.append(f'<text x="4" y="{y + 15}" font-size="12">{escape(label)}</text>'
                     f'<rect x="{label_w}" y="{y}" width="{length:.1f}" height="{bar_h}" fill="{BAR_COLORS.get(precision, "#999")}">'
                     f'<title>{escape(label)}: {value:.6g} {escape(unit)}</title></rect>'
                     f'<text x="{label_w + length + 4:.1f}" y="{y + 15}" font-size="12">{value:.4g} {escape(unit)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return escape(str(value))


def table(headers: list[str], rows: list[list[Any]], row_classes: list[str] | None = None, table_id: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(f'<tr class="{cls}">' + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>"
                   for row, cls in zip(rows, row_classes or [""] * len(rows)))
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def pareto_chart(search: dict[str, Any], chart_id: str = "chart-pareto") -> str:
    """Scatter of the search's trials: predicted latency (x) vs accuracy (y); the Pareto front joined, the chosen ringed."""
    points = [t for t in search["trials"] if t["state"] == "COMPLETE" and t.get("latency_ms") is not None
              and t.get("accuracy") is not None]
    if not points:
        return ""
    front = {t["number"] for t in search.get("pareto", [])}
    chosen = search["chosen"]["number"]
    width, height, left, right, top, bottom = 480, 320, 62, 16, 28, 44
    xs, ys = [t["latency_ms"] for t in points], [t["accuracy"] for t in points]
    budget = search.get("latency_budget_ms")
    x0, x1 = min(xs), max(xs)
    if budget is not None and x0 <= budget <= 1.5 * x1:
        x1 = max(x1, budget)
    pad_x, pad_y = (x1 - x0) * 0.08 or abs(x0) * 0.05 or 1e-6, (max(ys) - min(ys)) * 0.08 or 0.01
    x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, min(ys) - pad_y, max(ys) + pad_y
    sx = lambda v: left + (v - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    sy = lambda v: height - bottom - (v - y0) / (y1 - y0) * (height - top - bottom)  # noqa: E731
    parts = [f'<svg id="{chart_id}" class="chart" role="img" aria-label="Search trials: accuracy vs predicted latency" '
             f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
             f'<text x="4" y="16" font-weight="600">Search: accuracy vs predicted latency on {escape(str(search.get("latency_target") or ""))}</text>'
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#57606a"/>'
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#57606a"/>']
    for value in (x0 + pad_x, x1 - pad_x):
        parts.append(f'<text x="{sx(value):.1f}" y="{height - bottom + 16}" font-size="11" text-anchor="middle">{value:.4g}</text>')
    for value in (y0 + pad_y, y1 - pad_y):
        parts.append(f'<text x="{left - 4}" y="{sy(value) + 4:.1f}" font-size="11" text-anchor="end">{value:.4g}</text>')
    parts.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 8}" font-size="12" text-anchor="middle">predicted latency (ms, FP32)</text>'
                 f'<text x="14" y="{(top + height - bottom) / 2:.0f}" font-size="12" text-anchor="middle" '
                 f'transform="rotate(-90 14 {(top + height - bottom) / 2:.0f})">accuracy</text>')
    if budget is not None and x0 <= budget <= x1:
        parts.append(f'<line class="budget" x1="{sx(budget):.1f}" y1="{top}" x2="{sx(budget):.1f}" y2="{height - bottom}" '
                     f'stroke="#cf222e" stroke-dasharray="4 3"><title>latency budget {budget:g} ms</title></line>')
    line = sorted((t for t in points if t["number"] in front), key=lambda t: t["latency_ms"])
    if len(line) > 1:
        coords = " ".join(f"{sx(t['latency_ms']):.1f},{sy(t['accuracy']):.1f}" for t in line)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="#0969da" stroke-width="1.5"/>')
    for t in sorted(points, key=lambda t: (t["number"] in front, t["number"] == chosen)):
        kind = "chosen" if t["number"] == chosen else ("pareto" if t["number"] in front else "trial")
        fill = {"chosen": "#cf222e", "pareto": "#0969da", "trial": "#afb8c1"}[kind]
        radius = 7 if kind == "chosen" else 4.5
        label = f"trial {t['number']} ({kind}): accuracy {t['accuracy']:.4f}, {t['latency_ms']:.4g} ms, {t['params']}"
        parts.append(f'<circle class="{kind}" cx="{sx(t["latency_ms"]):.1f}" cy="{sy(t["accuracy"]):.1f}" r="{radius}" '
                     f'fill="{fill}" fill-opacity="0.85" stroke="#1b1f24" stroke-width="{1.5 if kind == "chosen" else 0.5}">'
                     f'<title>{escape(label)}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def search_section(search: dict[str, Any] | None) -> str:
    """The hyper-parameter search: settings, every trial, the Pareto front and the chosen point with its reason."""
    if not search:
        return ""
    params = list(search.get("space", {}))
    cv = search.get("cv_folds", 0) >= 2
    latency = "latency" in search.get("objectives", [])
    headers = ["trial", "state", *params, "mean accuracy" if cv else "val accuracy", *(["sd"] if cv else []),
               *(["predicted ms"] if latency else []), "epochs", "seconds"]
    chosen = search["chosen"]["number"]
    rows, classes = [], []
    for t in search["trials"]:
        accuracy = t.get("cv_mean") if cv and t.get("cv_mean") is not None else t.get("accuracy")
        rows.append([t["number"], t["state"].lower() + (" (chosen)" if t["number"] == chosen else ""),
                     *(t["params"].get(p, "") for p in params), "" if accuracy is None else accuracy,
                     *([t.get("cv_sd") if t.get("cv_sd") is not None else ""] if cv else []),
                     *([t.get("latency_ms") if t.get("latency_ms") is not None else ""] if latency else []),
                     t.get("epochs_run") or "", t.get("seconds") if t.get("seconds") is not None else ""])
        classes.append("ship" if t["number"] == chosen else ("reject" if t["state"] in ("PRUNED", "FAIL") else ""))
    resumed = search.get("resumed", {})
    notes = "".join(f"<li>{escape(n)}</li>" for n in search.get("notes", []))
    return (f'<h2 id="search">Hyper-parameter search</h2>'
            f'<p>{escape(search["sampler"])} sampler, {escape(search["pruner"])} pruner, {search["n_trials"]} trials '
            f'({resumed.get("trials_done_before", 0)} resumed from the study, {resumed.get("trials_run_now", 0)} run by this build), '
            f'{search["trial_epochs"]} epochs at most per trial on the {escape(search.get("validation", "validation split"))}; '
            f'objectives: {escape(", ".join(f"{o} ({d})" for o, d in zip(search["objectives"], search["directions"])))}. '
            f'Study <code>{escape(search["study_name"])}</code> in <code>{escape(search["storage"])}</code> '
            f'(re-run the same build to resume it).</p>'
            f'<p id="search-choice">Chosen <strong>{escape(str(search["chosen"]["params"]))}</strong>: {escape(search["chosen"]["reason"])}</p>'
            + (f"<ul>{notes}</ul>" if notes else "")
            + table(headers, rows, classes, "search-trials")
            + (f'<div class="charts">{pareto_chart(search)}</div>' if latency else ""))


COMPARED = ("parameters", "macs", "latency_ms_predicted")  # and the validation metric, named after the build's


def compression_section(report: dict[str, Any]) -> str:
    """Distillation, pruning and mixed precision: each decision in one sentence, with before/after numbers."""
    parts = []
    compared = (*COMPARED, f"val_{(report.get('train') or {}).get('metric', 'accuracy')}")
    steps = (("distill", "Distillation", "teacher", "student"), ("prune", "Structured pruning", "before", "after"))
    for key, title, old, new in steps:
        step = report.get(key)
        if not step:
            continue
        parts.append(f'<h3>{escape(step.get("title", title))}: {escape(step["decision"])}</h3><p>{escape(step["summary"])}</p>')
        if isinstance(step.get(old), dict) and isinstance(step.get(new), dict):
            rows = [[metric, step[old].get(metric, ""), step[new].get(metric, "")] for metric in compared]
            parts.append(table(["", old, new], rows, table_id=f"{key}-numbers"))
    gate = report["gate"]
    scale, unit = (100, "pp") if gate["fraction"] else (1, gate["metric"])
    parts.append(int8_section(report, scale, unit))
    mixed = report.get("mixed")
    if mixed:
        parts.append(f'<h3>Mixed precision</h3><p>{escape(mixed["decision"])}</p>')
        if mixed.get("sensitivity"):
            kept = set(mixed.get("float_layers", []))
            rows = [[layer, scale * drop, "float" if layer in kept else "int8"] for layer, drop in mixed["sensitivity"].items()]
            parts.append(table(["layer", f"validation drop when only it is INT8 ({unit})", "kept as"], rows, table_id="sensitivity"))
    return f"<h2>Compression</h2>{''.join(parts)}" if any(parts) else ""


def int8_section(report: dict[str, Any], scale: float, unit: str) -> str:
    """How static INT8 was calibrated (every method tried, by the metric on validation) and which
    layers the latency-aware variant keeps in float (from the per-layer profile)."""
    parts = []
    calibration = report.get("int8_calibration")
    if calibration and calibration.get("trials"):
        rows = [[t["label"], t["samples"], ", ".join(t["float_nodes"]) or "-", t["validation_value"], scale * t["validation_drop"],
                 t["seconds"]] for t in calibration["trials"]]
        classes = ["ship" if t["label"] == calibration["chosen"] else "" for t in calibration["trials"]]
        parts.append(f'<h3>INT8 calibration</h3><p id="int8-calibration">{escape(calibration["decision"])}</p>'
                     + table(["calibration", "samples", "kept in float", f"validation {calibration['metric']}",
                              f"drop ({unit})", "seconds"], rows, classes, "calibration-trials"))
    fast = report.get("int8_fast")
    if fast and fast.get("decision"):
        slower = fast.get("slower_in_int8") or []
        parts.append(f'<h3>Latency-aware INT8</h3><p id="int8-fast">{escape(fast["decision"])}</p>'
                     + (f"<p>Slower in INT8 than in FP32 on this host (onnxruntime's profile): {escape(', '.join(slower))}.</p>"
                        if slower else ""))
    return "".join(parts)


def targets_chart(rows: list[dict[str, Any]], chart_id: str = "chart-targets") -> str:
    """Horizontal bars of the predicted latency on each profile: green when every budget is met,
    red when one is not; the label says the latency budget and whether the number is calibrated."""
    width, bar_h, gap, label_w, value_w = 560, 20, 8, 150, 170
    height = 30 + len(rows) * (bar_h + gap)
    top = max((r["latency_ms"] for r in rows), default=1.0) or 1.0
    parts = [f'<svg id="{chart_id}" class="chart" role="img" aria-label="Predicted latency on every profile" '
             f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
             f'<text x="4" y="16" font-weight="600">Predicted latency of the shipped model on every profile</text>']
    for i, row in enumerate(rows):
        y = 28 + i * (bar_h + gap)
        length = max(1.0, (width - label_w - value_w) * row["latency_ms"] / top)
        fits = "fits" if row["fits"] else "misses"
        budget = row["budget"]["latency_ms"]["budget"]
        note = f'{row["latency_ms"]:.4g} ms{"*" if row["prediction"] == "calibrated" else ""} (budget {budget:g})'
        parts.append(f'<text x="4" y="{y + 14}" font-size="12">{escape(row["target"])}</text>'
                     f'<rect class="{fits}" x="{label_w}" y="{y}" width="{length:.1f}" height="{bar_h}" '
                     f'fill="{"#1a7f37" if row["fits"] else "#cf222e"}"><title>{escape(row["target"])}: {escape(note)}, '
                     f'{escape(row["prediction"])}; memory {row["memory_mb"]:.4g} MB; {fits} its budgets</title></rect>'
                     f'<text x="{label_w + length + 4:.1f}" y="{y + 14}" font-size="12">{escape(note)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def targets_section(rows: list[dict[str, Any]] | None) -> str:
    """Every shipped profile side by side: which boards the built model fits (predicted, not measured)."""
    if not rows:
        return ""
    table_rows = [[r["target"], r["latency_ms"], r["prediction"], r["memory_mb"], r["model_mb"],
                   *(_verdict(r["budget"][k]["met"]) for k in ("latency_ms", "ram_mb", "model_mb")),
                   "yes" if r["fits"] else "; ".join(["no", *r["not_supported"]])] for r in rows]
    classes = ["" if r["fits"] else "reject" for r in rows]
    return ('<h2 id="targets">Every profile</h2><p>Predicted for the shipped model on each shipped profile '
            '(* calibrated: fitted to measurements; otherwise the uncalibrated roofline). Memory is the serving '
            'process when calibrated, else weights and activations.</p>'
            + table(["profile", "latency ms", "prediction", "memory MB", "model MB", "latency budget", "RAM budget",
                     "flash budget", "fits"], table_rows, classes, "targets-table")
            + f'<div class="charts">{targets_chart(rows)}</div>')


def training_section(report: dict[str, Any]) -> str:
    """How the reference came to be: trained here (epochs, validation accuracy), or imported from a file."""
    train, imported = report.get("train"), report.get("import")
    if imported is not None:
        shapes = ", ".join(f"{s['name']} {s['shape']} {s['dtype']}" for s in imported.get("inputs", []))
        opset = (f"; opset {imported['opset_converted_from']} raised to 13" if imported.get("opset_converted_from") else "")
        return (f'<h2>Model file</h2><p id="model-file">Imported <code>{escape(imported["file"])}</code> (not trained here): '
                f'inputs {escape(shapes)}{escape(opset)}.</p>')
    if train is None:
        return ""
    validation = (f"validation accuracy {train['val_accuracy']:.4f}" if "val_accuracy" in train
                  else ", ".join(f"{k.removeprefix('val_')} {v:.4g}" for k, v in train.items() if k.startswith("val_")))
    return (f"<h2>Training</h2><p>{train['epochs_run']} epochs on {escape(train['device'])} (best {train['best_epoch']}, "
            f"patience {train['patience']}), {escape(validation)}, {train['parameters']:,} parameters.</p>")


def device_section(report: dict[str, Any]) -> str:
    """`--measure-on`: each candidate measured on the board next to the host and the prediction, and how far
    the prediction was from the board (the gate compared the board's p50)."""
    device = report["benchmark"].get("device")
    if not device:
        return ""

    def percent(value: Any) -> str:
        return "" if value is None else f"{100 * value:+.1f}%"

    rows = [[c["name"], c["latency_ms_p50_host"], c["latency_ms_predicted"], c.get("latency_ms_p50_device", ""),
             c.get("latency_ms_p99_device", ""), percent(c.get("prediction_error_device")), c.get("device_rss_mb", ""),
             c.get("device_error", "")] for c in report["candidates"]]
    return (f"<h2>Measured on device {escape(str(device['device']))} ({escape(str(device['profile']))})</h2>"
            f"<p>Every candidate timed by the device's agent in its own runtime (a signed benchmark job, "
            f"{device['settings']['runs']} runs); the gate compared these p50s. Stored: <code>{escape(str(device['stored']))}</code></p>"
            + table(["candidate", "host p50 ms", "predicted ms", "device p50 ms", "device p99 ms", "prediction error",
                     "device RSS MB", "device error"], rows, table_id="device"))


def render(report: dict[str, Any]) -> str:
    candidates = report["candidates"]
    shipped = report["shipped"]["name"]
    gate = report["gate"]
    metric, fraction = gate["metric"], gate["fraction"]
    scale = 100 if fraction else 1
    drop_unit = "pp" if fraction else metric
    candidate_rows = [[c["name"], c["precision"], c["metric_value"], scale * c["metric_drop"], c["latency_ms_p50_host"],
                       c["latency_ms_p90_host"], c["latency_ms_predicted"], c["bytes"] / 1024, c["verdict"]] for c in candidates]
    classes = ["ship" if c["name"] == shipped else ("" if c["accepted"] else "reject") for c in candidates]
    charts = "".join([
        bar_chart(f"{metric} (test split, device runtime)", "", [(c["name"], c["precision"], c["metric_value"]) for c in candidates], "chart-metric"),
        bar_chart("Latency p50 on this host", "ms", [(c["name"], c["precision"], c["latency_ms_p50_host"]) for c in candidates], "chart-latency"),
        bar_chart(f"Predicted latency on {report['target']['id']}", "ms", [(c["name"], c["precision"], c["latency_ms_predicted"]) for c in candidates], "chart-predicted"),
        bar_chart("Size", "KiB", [(c["name"], c["precision"], c["bytes"] / 1024) for c in candidates], "chart-size"),
    ])
    budget = report["shipped"]["budget"]
    budget_rows = [[key, v["value"], v["budget"], _verdict(v["met"])] for key, v in budget.items()]
    stage_rows = [[s["name"], s["seconds"]] for s in report["stages"]]
    notes = "".join(f"<li>{escape(n)}</li>" for n in report.get("notes", []))
    target = report["target"]
    direction = "higher" if gate["higher_is_better"] else "lower"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(report['project'])} v{report['version']} for {escape(target['id'])}</title>
<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head>
<body>
<h1>{escape(report['project'])} v{report['version']} &rarr; {escape(target['name'])}</h1>
<p class="muted">Built {escape(report['created'])} &middot; budget <code>{escape(report['budget'])}</code> &middot; seed {report['seed']}
 &middot; bundle <code id="bundle-file">{escape(report['bundle']['file'])}</code></p>
<h2>Decision</h2>
<p id="decision">Shipped <strong>{escape(shipped)}</strong> ({escape(report['shipped']['precision'])}):
{escape(metric)} {report['shipped']['metric_value']:.4f} vs reference {report['reference']['metric_value']:.4f},
host p50 {report['shipped']['latency_ms_p50_host']:.4f} ms, predicted on {escape(target['id'])} {report['shipped']['latency_ms_predicted']:.4f} ms,
{report['shipped']['bytes']:,} bytes.</p>
<p id="gate-rule">Gate: {escape(metric)} ({direction} is better, task {escape(report['task'])}) may drop by at most
{scale * gate['max_drop']:.4g} {escape(drop_unit)} ({escape(gate['max_drop_from'])}) on the test split.</p>
{table(["candidate", "precision", metric, f"drop ({drop_unit})", "host p50 ms", "host p90 ms", "predicted ms", "KiB", "gate verdict"], candidate_rows, classes, "candidates")}
<div class="charts">{charts}</div>
{device_section(report)}
<h2>Budgets of {escape(target['id'])} (shipped model)</h2>
{table(["budget", "value", "limit", "verdict"], budget_rows, table_id="budgets")}
{training_section(report)}
{targets_section(report.get("targets"))}
{search_section(report.get("search"))}
{compression_section(report)}
<h2>Stages</h2>
{table(["stage", "seconds"], stage_rows, table_id="stages")}
{f"<h2>Notes</h2><ul>{notes}</ul>" if notes else ""}
<p class="muted">Host latencies are measured on this machine with onnxruntime ({report['benchmark']['threads']} thread, candidates interleaved);
predicted latencies come from the per-operator roofline model of the target profile.</p>
</body></html>
"""
