"""Training throughput of keel's engine per precision, through the real CLI (`keel train`).

Prints a table and writes benchmarks/results/train-throughput-<device>.json. On a CUDA machine:
    python benchmarks/train_throughput.py --precisions no bf16 fp16
On a CPU (bf16 autocast on CPU is usually slower than fp32):
    python benchmarks/train_throughput.py --precisions no --samples 640
Extra key=value arguments after `--` go to every run as recipe overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def run(precision: str, args, extra: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as work:
        overrides = [
            f"model.name={args.model}",
            f"model.max_length={args.max_length}",
            f"train.batch_size={args.batch_size}",
            f"train.mixed_precision={precision}",
            f"data.max_train_samples={args.samples}",
            "data.max_eval_samples=512",
            "train.epochs=2",
            f"output.dir={work}/run",
            *extra,
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "keel", "run", args.recipe, *overrides],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"keel run failed for {precision}:\n{proc.stderr[-3000:]}")
        train = json.loads(Path(work, "run", "train.json").read_text())
        test = json.loads(Path(work, "run", "eval", "test.json").read_text())
    return {
        "precision": precision,
        "samples_per_second": train["samples_per_second"],
        "steps": train["steps"],
        "test_accuracy": round(test.get("accuracy", float("nan")), 4),
        "wall_seconds": round(wall, 1),
        "peak_rss_mb": train["peak_rss_mb"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="quickstart")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--precisions", nargs="+", default=["no", "bf16"])
    p.add_argument("--samples", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    args, extra = p.parse_known_args()
    extra = [x for x in extra if x != "--"]
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    rows = [run(prec, args, extra) for prec in args.precisions]
    base = rows[0]["samples_per_second"]
    print(
        f"keel train throughput on {device} (torch {torch.__version__}), {args.model}, batch {args.batch_size}, "
        f"length <= {args.max_length}, {args.samples} samples x 2 epochs"
    )
    print(f"{'precision':<10} {'samples/s':>10} {'speed-up':>9} {'steps':>6} {'test acc':>9} {'wall s':>7}")
    for r in rows:
        r["speedup_vs_first"] = round(r["samples_per_second"] / base, 2)
        print(
            f"{r['precision']:<10} {r['samples_per_second']:>10} {r['speedup_vs_first']:>9} {r['steps']:>6} "
            f"{r['test_accuracy']:>9} {r['wall_seconds']:>7}"
        )
    RESULTS.mkdir(exist_ok=True)
    tag = "gpu" if torch.cuda.is_available() else "cpu"
    out = RESULTS / f"train-throughput-{tag}.json"
    out.write_text(
        json.dumps(
            {
                "device": device,
                "torch": torch.__version__,
                "args": vars(args),
                "extra": extra,
                "command": "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:]),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
