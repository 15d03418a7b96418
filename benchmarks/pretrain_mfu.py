"""Pretraining throughput and model FLOPs utilisation (MFU) of keel's engine, through the real CLI (`keel train`).

A GPT-2-small-shaped model (12 layers, 768 wide, 1024 context) trained from scratch on the built-in Shakespeare
corpus with keel's engine (bf16 autocast, torch.compile and fused AdamW on CUDA). Tokens/s are taken from the
per-step timestamps in metrics.jsonl after the warm-up steps (compilation excluded); the peak is a measured
bf16 (CUDA) or fp32 (CPU) matmul rate on the same machine. FLOPs per token: 6N + 12*L*H*T (N parameters
without position embeddings, L layers, H width, T context), as in the PaLM paper and nanoGPT.

    python benchmarks/pretrain_mfu.py                                  # GPU: GPT-2 small, batch 16 and 32
    python benchmarks/pretrain_mfu.py --preset llama-micro --seq 64 --batch 4 --steps 8 --warmup 3 \
        --precision no --vocab 512                                     # CPU smoke check of the script
Writes benchmarks/results/pretrain-mfu-<device>.json (one record per batch size, each with `mfu`).
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

import torch

RESULTS = Path(__file__).parent / "results"

RECIPE = """
name: mfu
task: causal-lm
model: {{name: {preset}, init: scratch, max_length: {seq}}}
pretrain: {{vocab_size: {vocab}, samples: 0, compile: {compile}}}
data:
  name: shakespeare
  split: {{validation: 0.03, test: 0.0, seed: 0}}
  max_eval_samples: 4
train:
  epochs: 50
  max_steps: {steps}
  batch_size: {batch}
  eval_batch_size: 4
  lr: 6.0e-4
  warmup_ratio: 0.0
  schedule: constant
  mixed_precision: "{precision}"
  deterministic: false
"""


def matmul_peak(dtype: torch.dtype, device: str) -> float:
    """Measured dense matmul rate in FLOP/s (the best of several sizes)."""
    best = 0.0
    for n in (4096, 8192) if device == "cuda" else (512, 1024):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        reps = 50 if device == "cuda" else 5
        for _ in range(3):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


def flops_per_token(model_folder: Path, seq: int) -> tuple[float, int, dict]:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for name, p in model.named_parameters() if "wpe" not in name)
    layers, width = config.num_hidden_layers, config.hidden_size
    return 6 * n + 12 * layers * width * seq, n, {"layers": layers, "width": width, "vocab": config.vocab_size}


def run_one(args, batch: int, work: Path, peak: float) -> dict:
    recipe = work / f"mfu-{batch}.yaml"
    recipe.write_text(
        RECIPE.format(
            preset=args.preset,
            seq=args.seq,
            vocab=args.vocab,
            steps=args.steps,
            batch=batch,
            precision=args.precision,
            compile=str(not args.no_compile).lower(),
        )
    )
    out = work / f"run-{batch}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "keel", "train", str(recipe), f"output.dir={out}"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"keel train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "split" not in r]
    # Steps after the warm-up, leaving out the ones that straddle an epoch end (validation and a checkpoint happen there).
    timed = [(a, b) for a, b in zip(steps[args.warmup - 1 :], steps[args.warmup :]) if a["epoch"] == b["epoch"]]
    tokens = len(timed) * batch * args.seq
    tok_s = tokens / sum(b["seconds"] - a["seconds"] for a, b in timed)
    fpt, n, shape = flops_per_token(out / "model", args.seq)
    return {
        "preset": args.preset,
        **shape,
        "seq": args.seq,
        "batch": batch,
        "precision": args.precision,
        "compile": not args.no_compile,
        "params_without_wpe": n,
        "steps_timed": len(timed),
        "tokens_per_s": round(tok_s, 1),
        "flops_per_token": fpt,
        "achieved_tflops": round(tok_s * fpt / 1e12, 2),
        "peak_tflops": round(peak / 1e12, 1),
        "mfu": round(tok_s * fpt / peak, 4),
        "final_loss": steps[-1]["loss"],
        "first_loss": steps[0]["loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2-small")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=15, help="steps left out of the timing (compilation, caches)")
    ap.add_argument("--precision", default="bf16", choices=["no", "bf16", "fp16"])
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument(
        "--keep", type=Path, default=None, help="copy the last run's model folder here (for serving benchmarks)"
    )
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak_dtype = torch.bfloat16 if device == "cuda" and args.precision == "bf16" else torch.float32
    peak = matmul_peak(peak_dtype, device)
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    records = []
    with tempfile.TemporaryDirectory() as work:
        for batch in args.batch:
            records.append(run_one(args, batch, Path(work), peak))
        if args.keep:
            import shutil

            shutil.copytree(Path(work) / f"run-{args.batch[-1]}" / "model", args.keep, dirs_exist_ok=True)
    print(
        f"{'batch':>5} {'tokens/s':>12} {'TFLOP/s':>9} {'peak':>7} {'MFU':>6}  ({args.preset}, seq {args.seq}, {name})"
    )
    for r in records:
        print(
            f"{r['batch']:>5} {r['tokens_per_s']:>12,.0f} {r['achieved_tflops']:>9.2f} {r['peak_tflops']:>7.1f} {r['mfu']:>6.1%}"
        )
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"pretrain-mfu-{device}.json"
    best = max(records, key=lambda r: r["mfu"])
    path.write_text(
        json.dumps(
            {
                "device": name,
                "torch": torch.__version__,
                "mfu": best["mfu"],
                "runs": records,
                "rerun": "python benchmarks/pretrain_mfu.py " + " ".join(sys.argv[1:]),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
