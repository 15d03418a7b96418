"""Time `keel quickstart` end to end (the job `make demo` runs) and record what it learned.

Runs the real CLI in a fresh folder and prints a table; writes benchmarks/results/quickstart-<device>.json.
    .venv/bin/python benchmarks/quickstart.py            # CPU, as on a laptop
    .venv/bin/python benchmarks/quickstart.py train.mixed_precision=bf16
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main(overrides: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "keel", "quickstart", *overrides], cwd=work, env=env, capture_output=True, text=True
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"keel quickstart failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        run_dir = Path(work) / "runs" / "quickstart"
        test = json.loads((run_dir / "eval" / "test.json").read_text())
        train = json.loads((run_dir / "train.json").read_text())
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    import torch

    row = {
        "wall_seconds": round(wall, 1),
        "peak_rss_mb": round(peak_mb, 1),
        "train_samples_per_second": train["samples_per_second"],
        "steps": train["steps"],
        "test_accuracy": round(test["accuracy"], 4),
        "test_macro_f1": round(test["macro_f1"], 4),
        "baseline_accuracy": round(test["baseline"]["accuracy"], 4),
        "baseline_macro_f1": round(test["baseline"]["macro_f1"], 4),
        "test_n": test["n"],
        "overrides": overrides,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(["python benchmarks/quickstart.py", *overrides]),
    }
    width = max(map(len, row))
    for k, v in row.items():
        print(f"{k:<{width}}  {v}")
    RESULTS.mkdir(exist_ok=True)
    tag = "gpu" if torch.cuda.is_available() else "cpu"
    out = RESULTS / f"quickstart-{tag}.json"
    out.write_text(json.dumps(row, indent=2) + "\n")
    print(f"wrote {out}")
    return row


if __name__ == "__main__":
    main(sys.argv[1:])
