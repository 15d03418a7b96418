"""DP-SGD at epsilon = 8 vs the same non-private run, on the quickstart recipe (tweets-sentiment, MiniLM).

Both runs go through the real CLI (`keel run quickstart ...`) with the audit and compress sections switched off, in fresh folders.
Prints a table and writes benchmarks/results/dp-quickstart-<device>.json: seconds per optimiser step, their
ratio, test accuracy / macro-F1 and the accuracy gap, and the privacy figures of the DP run.

    .venv/bin/python benchmarks/dp_quickstart.py                                  # the full quickstart (long on 2 cores)
    .venv/bin/python benchmarks/dp_quickstart.py data.max_train_samples=600       # a shortened run (say so when quoting it)

Anchors: Opacus ghost clipping costs about 1.19x the time of non-private training; Li et al. 2022 get within a few
points of non-private accuracy on SST-2 at epsilon = 8. Aim: <= 2x time, <= 3 points.
Note: keel's DP path freezes the embedding tables (train.privacy.freeze_embeddings, the default); the non-private run
trains them. Pass train.privacy.freeze_embeddings=false to compare like with like (much slower: per-example
gradients of a 30k x 384 table).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def one_run(work: str, name: str, overrides: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "keel", "run", "quickstart", "audit=null", "compress=null", f"output.dir=runs/{name}",
                           *overrides], cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"keel run ({name}) failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    run_dir = Path(work) / "runs" / name
    train = json.loads((run_dir / "train.json").read_text())
    test = json.loads((run_dir / "eval" / "test.json").read_text())
    return {"wall_seconds": round(time.perf_counter() - t0, 1), "steps": train["steps"],
            "seconds_per_step": round(train["train_seconds_this_session"] / max(1, train["steps"]), 4),
            "test_accuracy": round(test["accuracy"], 4), "test_macro_f1": round(test["macro_f1"], 4),
            "test_n": test["n"], "privacy": train.get("privacy")}


def main(extra: list[str]) -> dict:
    import torch

    dp_overrides = ["train.privacy.target_epsilon=8", "train.privacy.delta=1e-5"]
    with tempfile.TemporaryDirectory() as work:
        base = one_run(work, "nonprivate", extra)
        dp = one_run(work, "dp-eps8", [*dp_overrides, *extra])
    row = {
        "nonprivate_seconds_per_step": base["seconds_per_step"], "dp_seconds_per_step": dp["seconds_per_step"],
        "step_time_ratio": round(dp["seconds_per_step"] / base["seconds_per_step"], 2),
        "nonprivate_test_accuracy": base["test_accuracy"], "dp_test_accuracy": dp["test_accuracy"],
        "accuracy_gap_points": round(100 * (base["test_accuracy"] - dp["test_accuracy"]), 1),
        "nonprivate_test_macro_f1": base["test_macro_f1"], "dp_test_macro_f1": dp["test_macro_f1"],
        "steps": [base["steps"], dp["steps"]], "test_n": base["test_n"],
        "dp_epsilon": round(dp["privacy"]["epsilon"], 3), "dp_delta": dp["privacy"]["delta"],
        "dp_noise_multiplier": round(dp["privacy"]["noise_multiplier"], 4), "dp_sample_rate": round(dp["privacy"]["sample_rate"], 5),
        "dp_accountant": dp["privacy"]["accountant"],
        "wall_seconds": [base["wall_seconds"], dp["wall_seconds"]],
        "overrides": extra, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}",
        "torch": torch.__version__, "python": platform.python_version(),
        "command": " ".join(["python benchmarks/dp_quickstart.py", *extra]),
    }
    width = max(map(len, row))
    for k, v in row.items():
        print(f"{k:<{width}}  {v}")
    RESULTS.mkdir(exist_ok=True)
    tag = "gpu" if torch.cuda.is_available() else "cpu"
    suffix = "" if not extra else "-short"
    out = RESULTS / f"dp-quickstart{suffix}-{tag}.json"
    out.write_text(json.dumps(row, indent=2) + "\n")
    print(f"wrote {out}")
    return row


if __name__ == "__main__":
    main(sys.argv[1:])
