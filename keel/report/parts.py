"""What every report section shares: a figure as an inline PNG, a JSON file that may be missing, a value as a cell."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path


def png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))
