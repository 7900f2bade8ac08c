"""Charts drawn on the server as SVG: no chart library and no front-end build. Each function returns markup
that is safe to insert into a page (labels are escaped)."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT, PAD = 720, 220, 36


def _scale(values: Sequence[float]) -> float:
    top = max(values, default=0.0)
    return top if top > 0 else 1.0


def bar_chart(labels: Sequence[str], values: Sequence[float], *, title: str, unit: str = "$") -> Markup:
    """Vertical bars, one per label (e.g. spend per day)."""
    top = _scale(values)
    inner_w, inner_h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD
    step = inner_w / max(len(values), 1)
    bar_w = max(step * 0.7, 1.0)
    parts = [f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {WIDTH} {HEIGHT}" '
             f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>',
             f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" class="axis"/>',
             f'<text x="{PAD - 4}" y="{PAD}" text-anchor="end" class="tick">{unit}{top:,.2f}</text>']
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        h = inner_h * value / top
        x = PAD + i * step + (step - bar_w) / 2
        parts.append(f'<rect class="bar" x="{x:.1f}" y="{HEIGHT - PAD - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}">'
                     f'<title>{escape(label)}: {unit}{value:,.6f}</title></rect>')
    if labels:
        parts.append(f'<text x="{PAD}" y="{HEIGHT - 10}" class="tick">{escape(labels[0])}</text>')
        parts.append(f'<text x="{WIDTH - PAD}" y="{HEIGHT - 10}" text-anchor="end" class="tick">{escape(labels[-1])}</text>')
    else:
        parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" class="tick">no data</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def line_chart(series: dict[str, Sequence[tuple[float, float]]], *, title: str, x_label: str, y_label: str) -> Markup:
    """Lines through (x, y) points, one per named series (e.g. training and validation loss by step)."""
    points = [p for s in series.values() for p in s]
    if not points:
        return Markup(f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" xmlns="http://www.w3.org/2000/svg">'
                      f'<title>{escape(title)}</title><text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" '
                      f'class="tick">no data yet</text></svg>')
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    inner_w, inner_h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD

    def xy(x: float, y: float) -> str:
        return f"{PAD + inner_w * (x - x0) / (x1 - x0):.1f},{HEIGHT - PAD - inner_h * (y - y0) / (y1 - y0):.1f}"

    parts = [f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {WIDTH} {HEIGHT}" '
             f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>',
             f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" class="axis"/>',
             f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{HEIGHT - PAD}" class="axis"/>',
             f'<text x="{PAD - 4}" y="{PAD}" text-anchor="end" class="tick">{y1:.3g}</text>',
             f'<text x="{PAD - 4}" y="{HEIGHT - PAD}" text-anchor="end" class="tick">{y0:.3g}</text>',
             f'<text x="{WIDTH - PAD}" y="{HEIGHT - 10}" text-anchor="end" class="tick">{escape(x_label)} {x1:g}</text>',
             f'<text x="{PAD}" y="{PAD - 12}" class="tick">{escape(y_label)}</text>']
    for i, (name, pts) in enumerate(series.items()):
        if not pts:
            continue
        path = " ".join(("M" if j == 0 else "L") + xy(x, y) for j, (x, y) in enumerate(sorted(pts)))
        parts.append(f'<path class="line line-{i}" d="{path}" data-series="{escape(name)}"><title>{escape(name)}</title></path>')
        parts.append(f'<text x="{WIDTH - PAD}" y="{PAD + 14 * i}" text-anchor="end" class="legend line-{i}">{escape(name)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def sparkline(values: Sequence[float | None], *, label: str, width: int = 90, height: int = 22) -> Markup:
    """A tiny line of recent values (oldest first), e.g. GPU temperature over the last heartbeats."""
    known = [v for v in values if v is not None]
    if len(known) < 2:
        return Markup(f'<span class="spark-empty" title="{escape(label)}">-</span>')
    lo, hi = min(known), max(known)
    span = hi - lo or 1.0
    step = width / (len(known) - 1)
    pts = " ".join(f"{i * step:.1f},{height - 2 - (height - 4) * (v - lo) / span:.1f}" for i, v in enumerate(known))
    return Markup(f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
                  f'xmlns="http://www.w3.org/2000/svg"><title>{escape(label)}: {known[-1]:g} (min {lo:g}, max {hi:g})'
                  f'</title><polyline points="{pts}"/></svg>')
