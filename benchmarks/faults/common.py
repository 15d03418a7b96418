"""Shared by the fault scripts: one row per attack, a table on the terminal, one JSON file per area.

A row says which fault was injected, what keel must do (the goal), what it did, and whether that meets the goal.
A fault script exits 0 when it could run its attacks, whatever they found: the table is the result.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass
class Row:
    fault: str  # what was done to keel: "1 of 17 clients sends lone surrogates"
    goal: str  # what keel must do: "0 innocent requests fail"
    observed: str  # what it did: "0 of 5,375 innocent requests failed"
    ok: bool


def report(area: str, rows: list[Row]) -> Path:
    """Print the rows as a table and write benchmarks/results/faults-<area>.json."""
    width = max([len(r.fault) for r in rows] + [5])
    print(f"\n{area}")
    for r in rows:
        print(f"  {'ok  ' if r.ok else 'FAIL'}  {r.fault:<{width}}  {r.observed}   (goal: {r.goal})")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"faults-{area}.json"
    script = Path(sys.argv[0]).resolve()
    command = " ".join(["python", script.relative_to(RESULTS.parents[1]).as_posix(), *sys.argv[1:]])
    out.write_text(json.dumps({"area": area, "command": command, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    print(f"wrote {out}")
    return out
