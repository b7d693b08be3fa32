"""A model version's report.html: what it learned and how it compares, in one page.

`render(meta)` is a pure function of the version's metadata.json (with its `history` of
losses by epoch): the page can be rebuilt from the metadata alone, and it stands on its
own, with inline SVG figures and inline CSS, no JavaScript, no network, no other file.
Every key is optional, so metadata from an older smocsd or a user job still renders.
"""

from __future__ import annotations

import math
from html import escape
from statistics import NormalDist
from typing import Any

WIDTH, HEIGHT = 640, 240
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 20, 40
TRAIN_COLOUR, VAL_COLOUR, THRESHOLD_COLOUR, FIT_COLOUR = "#1f77b4", "#d62728", "#b00020", "#888"

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 24px 0 8px; }
table { border-collapse: collapse; }
td, th { padding: 2px 12px 2px 0; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.promoted { color: #1a7f37; } .rejected { color: #b00020; }
.note { color: #666; }
svg { display: block; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
"""


def _num(value: Any) -> float | None:
    """A finite number, or None for anything else (missing, null, NaN, a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt(value: Any) -> str:
    number = _num(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if number is None:
        return "&ndash;" if value is None else escape(str(value))
    if isinstance(value, int):
        return str(value)
    return f"{number:.4g}"


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(
        f"<tr><th>{escape(name)}</th>"
        f"<td{' class=n' if _num(value) is not None else ''}>{_fmt(value)}</td></tr>"
        for name, value in rows
    )
    return f"<table>{cells}</table>"


class _Axes:
    """Maps data coordinates onto the plot area of one WIDTH by HEIGHT figure."""

    def __init__(self, x0: float, x1: float, y0: float, y1: float):
        self.x0, self.x1 = x0, x1 if x1 > x0 else x0 + 1
        self.y0, self.y1 = y0, y1 if y1 > y0 else y0 + 1

    def x(self, value: float) -> float:
        return LEFT + (value - self.x0) / (self.x1 - self.x0) * (WIDTH - LEFT - RIGHT)

    def y(self, value: float) -> float:
        return HEIGHT - BOTTOM - (value - self.y0) / (self.y1 - self.y0) * (HEIGHT - TOP - BOTTOM)

    def frame(self, xlabel: str, xticks: list[tuple[float, str]], yticks: list[float]) -> str:
        parts = [
            f"<rect x='{LEFT}' y='{TOP}' width='{WIDTH - LEFT - RIGHT}' "
            f"height='{HEIGHT - TOP - BOTTOM}' fill='none' stroke='#999'/>"
        ]
        for value, label in xticks:
            x = self.x(value)
            parts.append(
                f"<line x1='{x:.1f}' x2='{x:.1f}' y1='{HEIGHT - BOTTOM}' "
                f"y2='{HEIGHT - BOTTOM + 4}' stroke='#999'/>"
                f"<text x='{x:.1f}' y='{HEIGHT - BOTTOM + 16}' "
                f"text-anchor='middle'>{escape(label)}</text>"
            )
        for value in yticks:
            y = self.y(value)
            parts.append(
                f"<line x1='{LEFT - 4}' x2='{LEFT}' y1='{y:.1f}' y2='{y:.1f}' stroke='#999'/>"
                f"<text x='{LEFT - 6}' y='{y + 4:.1f}' text-anchor='end'>{value:.3g}</text>"
            )
        parts.append(
            f"<text x='{(LEFT + WIDTH - RIGHT) / 2}' y='{HEIGHT - 6}' "
            f"text-anchor='middle'>{escape(xlabel)}</text>"
        )
        return "".join(parts)


def _svg(title: str, body: str) -> str:
    t = escape(title)
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{HEIGHT}' "
        f"viewBox='0 0 {WIDTH} {HEIGHT}' role='img' aria-label='{t}'><title>{t}</title>"
        f"{body}</svg>"
    )


def _legend(items: list[tuple[str, str]]) -> str:
    parts, x = [], LEFT + 8
    for label, colour in items:
        parts.append(
            f"<rect x='{x}' y='{TOP + 8}' width='12' height='3' fill='{colour}'/>"
            f"<text x='{x + 16}' y='{TOP + 13}'>{escape(label)}</text>"
        )
        x += 24 + 7 * len(label)
    return "".join(parts)


def _polylines(axes: _Axes, values: list[float | None], colour: str) -> str:
    """One polyline per run of finite values; a lone point is a dot."""
    runs: list[list[tuple[float, float]]] = [[]]
    for epoch, value in enumerate(values, 1):
        if value is None:
            runs.append([])
        else:
            runs[-1].append((axes.x(epoch), axes.y(value)))
    out = []
    for run in runs:
        if len(run) == 1:
            out.append(f"<circle cx='{run[0][0]:.1f}' cy='{run[0][1]:.1f}' r='3' fill='{colour}'/>")
        elif run:
            points = " ".join(f"{x:.1f},{y:.1f}" for x, y in run)
            out.append(
                f"<polyline points='{points}' fill='none' stroke='{colour}' stroke-width='2'/>"
            )
    return "".join(out)


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (count - 1) for i in range(count)]


def loss_figure(history: dict) -> str:
    train = [_num(v) for v in history.get("train_loss") or []]
    val = [_num(v) for v in history.get("val_loss") or []]
    epochs = max(len(train), len(val))
    finite = [v for v in train + val if v is not None]
    if not epochs or not finite:
        return "<p class='note'>No losses by epoch were recorded for this version.</p>"
    lo, hi = min(0.0, min(finite)), max(finite) * 1.05
    axes = _Axes(1, max(epochs, 2), lo, hi)
    step = max(1, math.ceil(epochs / 10))
    xticks = [(e, str(e)) for e in range(1, epochs + 1, step)]
    body = (
        axes.frame("epoch", xticks, _ticks(lo, hi))
        + _polylines(axes, train, TRAIN_COLOUR)
        + _polylines(axes, val, VAL_COLOUR)
        + _legend([("training loss", TRAIN_COLOUR), ("validation loss", VAL_COLOUR)])
    )
    return _svg("Training and validation loss by epoch", body)


def score_figure(meta: dict) -> str:
    """The window scores on a log axis: the fitted log-normal, the quantiles, the threshold."""
    fit = meta.get("threshold_fit") or {}
    quantiles = meta.get("score_quantiles") or {}
    threshold = _num(meta.get("threshold"))
    median, scale = _num(fit.get("log_median")), _num(fit.get("log_scale"))
    marks: list[tuple[str, str, float]] = []  # (set, quantile name, log10 score)
    for name in ("training", "validation"):
        for q, value in (quantiles.get(name) or {}).items():
            v = _num(value)
            if v is not None and v > 0:
                marks.append((name, str(q), math.log10(v)))
    xs = [m[2] for m in marks]
    if threshold is not None and threshold > 0:
        xs.append(math.log10(threshold))
    has_fit = median is not None and scale is not None and scale > 0
    if has_fit:
        xs += [(median - 3 * scale) / math.log(10), (median + 4 * scale) / math.log(10)]
    if not xs:
        return "<p class='note'>No score distribution was recorded for this version.</p>"
    x0, x1 = math.floor(min(xs) * 2) / 2, math.ceil(max(xs) * 2) / 2
    axes = _Axes(x0, x1, 0, 1.15)
    xticks = [(d, f"{10**d:.3g}") for d in range(math.ceil(x0), math.floor(x1) + 1)]
    kind = meta.get("score", "mse")  # versions before channel-max say "mse" or nothing
    parts = [axes.frame(f"window score ({kind}, log scale)", xticks, [])]
    if has_fit:
        # The log-normal in log10(score) is a normal; scaled to peak at 1.
        dist = NormalDist(median / math.log(10), scale / math.log(10))
        peak = dist.pdf(dist.mean)
        steps = 120
        points = " ".join(
            f"{axes.x(x):.1f},{axes.y(dist.pdf(x) / peak):.1f}"
            for x in (x0 + (x1 - x0) * i / steps for i in range(steps + 1))
        )
        parts.append(
            f"<polyline points='{points}' fill='#eee' stroke='{FIT_COLOUR}' stroke-width='1.5'/>"
        )
    rows = {"training": 0.2, "validation": 0.45}
    colours = {"training": TRAIN_COLOUR, "validation": VAL_COLOUR}
    for name, q, x in marks:
        px, py = axes.x(x), axes.y(rows[name])
        parts.append(
            f"<circle cx='{px:.1f}' cy='{py:.1f}' r='3.5' fill='{colours[name]}'>"
            f"<title>{escape(name)} {escape(q)}: {10**x:.4g}</title></circle>"
        )
    for name in rows:
        if any(m[0] == name for m in marks):
            ends = [axes.x(m[2]) for m in marks if m[0] == name]
            y = axes.y(rows[name])
            parts.append(
                f"<line x1='{min(ends):.1f}' x2='{max(ends):.1f}' y1='{y:.1f}' y2='{y:.1f}' "
                f"stroke='{colours[name]}'/>"
            )
    if threshold is not None and threshold > 0:
        tx = axes.x(math.log10(threshold))
        parts.append(
            f"<line x1='{tx:.1f}' x2='{tx:.1f}' y1='{TOP}' y2='{HEIGHT - BOTTOM}' "
            f"stroke='{THRESHOLD_COLOUR}' stroke-width='2' stroke-dasharray='6 3'/>"
            f"<text x='{tx - 4:.1f}' y='{TOP + 28}' text-anchor='end' "
            f"fill='{THRESHOLD_COLOUR}'>threshold {threshold:.4g}</text>"
        )
    parts.append(
        _legend(
            [
                ("fitted log-normal", FIT_COLOUR),
                ("training quantiles", TRAIN_COLOUR),
                ("validation quantiles", VAL_COLOUR),
            ]
        )
    )
    return _svg("Validation score distribution and threshold", "".join(parts))


def channel_figure(channel_error: dict) -> str:
    rows = [
        (str(name), _num((entry or {}).get("val_mse")), _num((entry or {}).get("share")))
        for name, entry in channel_error.items()
        if isinstance(entry, dict)
    ]
    rows = [r for r in rows if r[1] is not None]
    if not rows:
        return "<p class='note'>No per-channel error was recorded for this version.</p>"
    bar, gap, label_w = 22, 8, 140
    height = TOP + len(rows) * (bar + gap) + 10
    top = max(v for _, v, _ in rows) or 1.0
    span = WIDTH - label_w - 120
    parts = []
    for i, (name, mse, share) in enumerate(rows):
        y = TOP + i * (bar + gap)
        w = max(1.0, mse / top * span)
        share_text = f" ({share:.0%})" if share is not None else ""
        parts.append(
            f"<text x='{label_w - 8}' y='{y + bar * 0.7:.1f}' text-anchor='end'>"
            f"{escape(name)}</text><rect x='{label_w}' y='{y}' width='{w:.1f}' height='{bar}' "
            f"fill='{VAL_COLOUR}' opacity='0.75'/><text x='{label_w + w + 6:.1f}' "
            f"y='{y + bar * 0.7:.1f}'>{mse:.4g}{share_text}</text>"
        )
    t = escape("Reconstruction error by channel")
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{height}' "
        f"viewBox='0 0 {WIDTH} {height}' role='img' aria-label='{t}'><title>{t}</title>"
        f"<text x='{label_w}' y='{TOP - 6}'>validation MSE (share of the error)</text>"
        f"{''.join(parts)}</svg>"
    )


def _comparison(meta: dict) -> str:
    ev = meta.get("eval") or {}
    outcome = str(meta.get("outcome", "unknown"))
    val_loss = (meta.get("metrics") or {}).get("val_loss", ev.get("val_loss"))
    previous, prev_version = ev.get("previous_val_loss"), ev.get("previous_version")
    problem = ev.get("champion_problem")
    if problem:
        sentence = f"The current model was damaged ({problem}): this version was judged alone."
    elif previous is None:
        sentence = "There was no current model to compare with (or it had other channels)."
    else:
        sentence = f"Compared with v{prev_version} on the same validation windows."
    rows = [
        ("outcome", outcome),
        ("validation loss, this version", val_loss),
        (
            f"validation loss, v{prev_version}" if prev_version else "validation loss, champion",
            previous,
        ),
    ]
    v, p = _num(val_loss), _num(previous)
    if v is not None and p is not None and p > 0:
        rows.append(("change", f"{(v - p) / p:+.1%}"))
    return f"<p>{escape(sentence)}</p>{_table(rows)}"


WHY = {
    "alarm": "the model that was current alarmed on them",
    "spike": "one window far above its threshold",
    "excluded": "an excluded period (smocsd exclude)",
}


def left_out_section(meta: dict) -> str:
    """The rows kept out of training and why, and the accepted ranges trained on."""
    ev = meta.get("eval") or {}
    left = (meta.get("data") or {}).get("left_out")
    if left is None:
        return "<p class='note'>Not recorded (saved before smocsd screened new rows).</p>"
    rows: list[tuple[str, Any]] = [("rows left out", left.get("rows"))]
    rows += [
        (f"{r.get('first')} … {r.get('last')}: {WHY.get(r.get('why'), '?')}", r.get("rows"))
        for r in left.get("ranges") or []
    ]
    rows += [
        (f"{r.get('first')} … {r.get('last')}: accepted as normal, trained on", r.get("rows"))
        for r in left.get("accepted") or []
    ]
    kept = ev.get("alarm_windows_kept")
    if ev.get("champion_alarm_windows"):
        rows.append(
            (
                f"of the {ev['champion_alarm_windows']} windows the champion alarms on there, "
                "this version alarms on",
                f"{kept:.1%}" if isinstance(kept, (int, float)) else None,
            )
        )
    note = f"<p>Not promoted: {escape(str(ev['rejection']))}.</p>" if ev.get("rejection") else ""
    return f"{_table(rows)}{note}"


def render(meta: dict) -> str:
    """The whole report.html of the version `meta` (its metadata.json) describes."""
    version = meta.get("version")
    name = str(meta.get("name", "model"))
    heading = f"{name} v{version:06d}" if isinstance(version, int) else name
    outcome = str(meta.get("outcome", "unknown"))
    metrics = meta.get("metrics") or {}
    data, time_ = meta.get("data") or {}, meta.get("time") or {}
    channels = ", ".join(str(c) for c in meta.get("channels") or [])
    summary = _table(
        [
            ("created", meta.get("created_at")),
            ("device", meta.get("device_id")),
            ("backend", meta.get("backend")),
            ("channels", channels),
            ("window size / stride", f"{meta.get('window_size')} / {meta.get('stride')}"),
            ("epochs run", metrics.get("epochs_run")),
            ("warm started", metrics.get("warm_started")),
            ("training loss", metrics.get("train_loss")),
            ("validation loss", metrics.get("val_loss")),
            ("threshold", meta.get("threshold")),
        ]
    )
    fit = meta.get("threshold_fit") or {}
    fit_note = (
        f"Threshold fitted by {fit.get('method', '?')}: false alarm rate "
        f"{_fmt(fit.get('false_alarm_rate'))} at confidence {_fmt(fit.get('confidence'))}, "
        f"from {_fmt(fit.get('windows'))} windows ({_fmt(fit.get('effective_windows'))} "
        f"effective); log median {_fmt(fit.get('log_median'))}, log scale "
        f"{_fmt(fit.get('log_scale'))}."
    )
    over = (meta.get("eval") or {}).get("val_windows_over_threshold")
    seen = _table(
        [
            ("rows read", data.get("rows")),
            ("rows dropped (missing or non-numeric values)", data.get("dropped_rows")),
            ("windows", data.get("windows")),
            ("training windows", data.get("train_windows")),
            ("validation windows", data.get("val_windows")),
            ("order range", f"{data.get('first_order')} … {data.get('last_order')}"),
            ("sampling interval (s)", time_.get("interval_s")),
            ("max gap (s)", time_.get("max_gap_s")),
            ("time gaps", time_.get("gaps")),
            ("times out of order", time_.get("out_of_order")),
            ("duplicate times", time_.get("duplicate_times")),
            ("rows without time", time_.get("rows_without_time")),
        ]
    )
    software = meta.get("software") or {}
    footer = ", ".join(f"{escape(str(k))} {escape(str(v))}" for k, v in software.items())
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(heading)}</title><style>{CSS}</style></head><body>"
        f"<h1>{escape(heading)} <span class='{escape(outcome)}'>{escape(outcome)}</span></h1>"
        f"{summary}"
        f"<h2>Loss by epoch</h2>{loss_figure(meta.get('history') or {})}"
        f"<h2>Score distribution</h2>{score_figure(meta)}"
        f"<p class='note'>{escape(fit_note)} Share of validation windows over the threshold: "
        f"{_fmt(over)}.</p>"
        f"<h2>Error by channel</h2>{channel_figure(meta.get('channel_error') or {})}"
        f"<h2>Data</h2>{seen}"
        f"<h2>Left out of training</h2>{left_out_section(meta)}"
        f"<h2>Against the champion</h2>{_comparison(meta)}"
        f"<p class='note'>Written by {footer} from this version's metadata.json.</p>"
        "</body></html>\n"
    )
