"""A line chart as SVG text, with no plotting dependency: the benchmarks' figures against context length."""

from __future__ import annotations

import math
from html import escape


def _ticks(lo: float, hi: float, n: int = 5, binary: bool = False) -> list[float]:
    """About n round tick values covering [lo, hi]: 1, 2 or 5 times a power of ten apart, or a power of two apart
    (`binary`: token counts, 8K, 16K, ...)."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    if binary:
        step = 2 ** math.ceil(math.log2(raw))
    else:
        step = 10 ** math.floor(math.log10(raw))
        step *= next(m for m in (1, 2, 5, 10) if raw <= m * step)
    return [i * step for i in range(math.floor(lo / step), math.ceil(hi / step) + 1)]


def _fmt(v: float, binary: bool = False) -> str:
    if binary and v and v % 1024 == 0:
        return f"{v / 1024:g}K"
    return f"{v:g}"


def line_panels(x: list[float], panels: list[tuple[str, list[float]]], title: str, x_label: str,
                width: int = 720, panel_height: int = 220) -> str:
    """SVG text: one panel per (y label, y values) stacked vertically, sharing the x axis (token counts: ticks a
    power of two apart, 8K = 8192), points joined by lines and marked. Units go in the labels."""
    left, right, top, gap, bottom = 70, 20, 40, 50, 45
    height = top + len(panels) * panel_height + (len(panels) - 1) * gap + bottom
    xt = _ticks(0, max(x), binary=True)
    x0, x1 = xt[0], xt[-1]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>']
    px = lambda v: left + (v - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    for k, (label, y) in enumerate(panels):
        ptop = top + k * (panel_height + gap)
        yt = _ticks(0, max(y) * 1.05)
        y0, y1 = yt[0], yt[-1]
        py = lambda v: ptop + panel_height - (v - y0) / (y1 - y0) * panel_height  # noqa: E731
        for t in yt:
            out.append(f'<line x1="{left}" x2="{width - right}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
        for t in xt:
            out.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{ptop}" y2="{ptop + panel_height}" '
                       f'stroke="#eee"/>')
            out.append(f'<text x="{px(t):.1f}" y="{ptop + panel_height + 16}" text-anchor="middle">'
                       f'{_fmt(t, True)}</text>')
        out.append(f'<rect x="{left}" y="{ptop}" width="{width - left - right}" height="{panel_height}" fill="none" '
                   f'stroke="#444"/>')
        out.append(f'<text transform="translate(16 {ptop + panel_height / 2}) rotate(-90)" text-anchor="middle">'
                   f'{escape(label)}</text>')
        pts = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in zip(x, y))
        out.append(f'<polyline points="{pts}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
        out += [f'<circle cx="{px(a):.1f}" cy="{py(b):.1f}" r="3" fill="#1f77b4"/>' for a, b in zip(x, y)]
    out.append(f'<text x="{left + (width - left - right) / 2}" y="{height - 10}" text-anchor="middle">'
               f'{escape(x_label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
