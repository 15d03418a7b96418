"""What every report section shares: a figure as an inline PNG (or SVG, for `keel ui`), a JSON file that may be
missing, a value as a cell."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path

# text stays text in the SVG (XML-escaped by matplotlib, searchable); "$" in a run or group name is not math
SVG_RC = {"svg.fonttype": "none", "svg.hashsalt": "keel", "text.parse_math": False}


def png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def svg(fig, label: str = "plot") -> str:
    """A figure as inline ``<svg>`` markup: no XML prolog, metadata or ``<style>`` element (a page's CSP allows none).
    Build the figure inside ``matplotlib.rc_context(SVG_RC)`` when its labels come from outside."""
    import matplotlib
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    with matplotlib.rc_context(SVG_RC):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>|<style[^>]*>.*?</style>", "", text, flags=re.S)
    return text.replace("<svg ", f'<svg role="img" aria-label="{html.escape(label)}" ', 1)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def fmt(v) -> str:
    """A cell as a person writes it: scores to 4 places, yes/no for flags, a word for what was not measured."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "not measured"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))


def num(v, places: int = 1, unit: str = "") -> str | None:
    """A measured quantity with a thousands separator and its unit; None when it was not measured."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return f"{v:,.{places}f}{unit}"


def svg_lines(
    series: list[dict], title: str, x_label: str, y_label: str, y_range: tuple[float, float] = (0.0, 1.0)
) -> str:
    """An inline SVG line plot (no matplotlib, so it stays text in the page and in a diff).

    ``series``: ``[{"label": str, "points": [(x, y, tip), ...], "color": "#rrggbb", "dash": bool}]``; ``tip`` is a
    point's tooltip (or None). Points whose y is None are left out. Every string is escaped here.
    """
    w, h, left, right, top, bottom = 640, 300, 52, 180, 28, 40
    xs = [p[0] for s in series for p in s["points"] if p[1] is not None]
    x0, x1 = (min(xs), max(xs)) if xs else (0, 1)
    span = (x1 - x0) or 1
    lo, hi = y_range

    def px(v: float) -> float:
        return left + (w - left - right) * (v - x0) / span

    def py(v: float) -> float:
        return h - bottom - (h - top - bottom) * (min(max(v, lo), hi) - lo) / ((hi - lo) or 1)

    esc = html.escape
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
        f'font-family="sans-serif" font-size="11" role="img" aria-label="{esc(title)}">',
        f'<text x="{(w - right + left) / 2}" y="16" text-anchor="middle">{esc(title)}</text>',
        f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="#333"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="#333"/>',
        f'<text x="{(w - right + left) / 2}" y="{h - 6}" text-anchor="middle">{esc(x_label)}</text>',
        f'<text x="12" y="{(h - bottom + top) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 12 {(h - bottom + top) / 2})">{esc(y_label)}</text>',
    ]
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        out.append(f'<text x="{left - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    for v in sorted(set(xs)):
        out.append(f'<text x="{px(v):.1f}" y="{h - bottom + 14}" text-anchor="middle">{esc(f"{v:g}")}</text>')
    for i, s in enumerate(series):
        color = esc(s.get("color") or "#555")
        pts = [p for p in s["points"] if p[1] is not None]
        dash = ' stroke-dasharray="5,4"' if s.get("dash") else ""
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y, _ in pts)
        out.append(
            f'<g class="series"><polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"{dash}/>'
        )
        for x, y, tip in pts:
            title_tag = f"<title>{esc(str(tip))}</title>" if tip else ""
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}">{title_tag}</circle>')
        ly = top + 8 + 16 * i
        out.append(
            f'<line x1="{w - right + 8}" y1="{ly - 4}" x2="{w - right + 28}" y2="{ly - 4}" stroke="{color}" '
            f'stroke-width="2"{dash}/><text x="{w - right + 34}" y="{ly}" fill="{color}">{esc(str(s["label"]))}</text></g>'
        )
    out.append("</svg>")
    return "\n".join(out)
