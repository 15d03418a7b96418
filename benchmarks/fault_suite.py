"""Runs every fault script in benchmarks/faults/ and prints one table: each attack, its goal, what keel did.

    python benchmarks/fault_suite.py            # all areas
    python benchmarks/fault_suite.py serve      # the areas whose name contains "serve"

Each area writes benchmarks/results/faults-<area>.json; this script adds benchmarks/results/faults.json.
Exit status 1 when any row misses its goal.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def main(argv: list[str]) -> int:
    scripts = sorted(p for p in (HERE / "faults").glob("*.py") if p.name != "common.py")
    scripts = [p for p in scripts if not argv or any(a in p.stem for a in argv)]
    areas, failed = [], 0
    for script in scripts:
        proc = subprocess.run([sys.executable, str(script)], cwd=HERE.parent)
        out = RESULTS / f"faults-{script.stem}.json"
        if proc.returncode != 0 or not out.is_file():
            areas.append(
                {
                    "area": script.stem,
                    "rows": [
                        {
                            "fault": "the script itself",
                            "goal": "runs",
                            "observed": f"exit {proc.returncode}",
                            "ok": False,
                        }
                    ],
                }
            )
        else:
            areas.append(json.loads(out.read_text()))
    print("\nfault suite")
    for area in areas:
        for row in area["rows"]:
            failed += not row["ok"]
            print(f"  {'ok  ' if row['ok'] else 'FAIL'}  {area['area']:<10} {row['fault']}: {row['observed']}")
    (RESULTS / "faults.json").write_text(json.dumps({"areas": areas, "failed": failed}, indent=2) + "\n")
    print(f"{failed} of {sum(len(a['rows']) for a in areas)} rows miss their goal")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
