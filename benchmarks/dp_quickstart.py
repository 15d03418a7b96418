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
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "keel",
            "run",
            "quickstart",
            "audit=null",
            "compress=null",
            f"output.dir=runs/{name}",
            *overrides,
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"keel run ({name}) failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    run_dir = Path(work) / "runs" / name
    train = json.loads((run_dir / "train.json").read_text())
    test = json.loads((run_dir / "eval" / "test.json").read_text())
    return {
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "steps": train["steps"],
        "seconds_per_step": round(train["train_seconds_this_session"] / max(1, train["steps"]), 4),
        "ms_per_example": round(1e3 / train["samples_per_second"], 3),
        "validation_score": train["best_metric"],
        "test_accuracy": round(test["accuracy"], 4),
        "test_macro_f1": round(test["macro_f1"], 4),
        "test_n": test["n"],
        "privacy": train.get("privacy"),
    }


def main() -> dict:
    import argparse

    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="key=value for both runs")
    ap.add_argument(
        "--dp",
        action="append",
        default=[],
        metavar="K=V,K=V",
        help="a DP variant: overrides for the private run only (repeat for several; the one with the best "
        "validation score is the headline, so the test split never picks it)",
    )
    ap.add_argument("--tag", default=None, help="results/dp-quickstart-<tag>.json")
    args = ap.parse_args()
    extra = args.overrides
    variants = [v.split(",") for v in args.dp] or [[]]
    dp_overrides = ["train.privacy.target_epsilon=8", "train.privacy.delta=1e-5"]
    with tempfile.TemporaryDirectory() as work:
        base = one_run(work, "nonprivate", extra)
        dps = [one_run(work, f"dp-eps8-{i}", [*dp_overrides, *extra, *v]) for i, v in enumerate(variants)]
    for d, v in zip(dps, variants):
        d["dp_overrides"] = v
        print(
            f"DP {' '.join(v) or '(same settings)'}: validation {d['validation_score']:.4f}, test accuracy "
            f"{d['test_accuracy']:.4f}, epsilon {d['privacy']['epsilon']:.3f}",
            flush=True,
        )
    dp = max(dps, key=lambda d: d["validation_score"])
    row = {
        "nonprivate_seconds_per_step": base["seconds_per_step"],
        "dp_seconds_per_step": dp["seconds_per_step"],
        "step_time_ratio": round(dp["seconds_per_step"] / base["seconds_per_step"], 2),
        "nonprivate_ms_per_example": base["ms_per_example"],
        "dp_ms_per_example": dp["ms_per_example"],
        "example_time_ratio": round(dp["ms_per_example"] / base["ms_per_example"], 2),
        "nonprivate_test_accuracy": base["test_accuracy"],
        "dp_test_accuracy": dp["test_accuracy"],
        "accuracy_gap_points": round(100 * (base["test_accuracy"] - dp["test_accuracy"]), 1),
        "nonprivate_test_macro_f1": base["test_macro_f1"],
        "dp_test_macro_f1": dp["test_macro_f1"],
        "steps": [base["steps"], dp["steps"]],
        "test_n": base["test_n"],
        "dp_epsilon": round(dp["privacy"]["epsilon"], 3),
        "dp_delta": dp["privacy"]["delta"],
        "dp_noise_multiplier": round(dp["privacy"]["noise_multiplier"], 4),
        "dp_sample_rate": round(dp["privacy"]["sample_rate"], 5),
        "dp_accountant": dp["privacy"]["accountant"],
        "dp_overrides": dp["dp_overrides"],
        "wall_seconds": [base["wall_seconds"], dp["wall_seconds"]],
        "variants": [
            {
                k: d[k]
                for k in (
                    "dp_overrides",
                    "validation_score",
                    "test_accuracy",
                    "test_macro_f1",
                    "steps",
                    "seconds_per_step",
                    "ms_per_example",
                    "wall_seconds",
                )
            }
            for d in dps
        ],
        "overrides": extra,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(["python benchmarks/dp_quickstart.py", *sys.argv[1:]]),
    }
    width = max(map(len, row))
    for k, v in row.items():
        if k != "variants":
            print(f"{k:<{width}}  {v}")
    RESULTS.mkdir(exist_ok=True)
    tag = args.tag or (("gpu" if torch.cuda.is_available() else "cpu") + ("-short" if extra else ""))
    out = RESULTS / f"dp-quickstart-{tag}.json"
    out.write_text(json.dumps(row, indent=2) + "\n")
    print(f"wrote {out}")
    return row


if __name__ == "__main__":
    main()
