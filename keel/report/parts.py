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
