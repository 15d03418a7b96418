"""FSDP against DDP on CPU (gloo): step time and peak memory per process for a small causal LM, 2 processes.

Each round launches `torchrun --nproc_per_node 2` on this file, once per strategy, alternating the order
(ddp, fsdp, fsdp, ddp, ...). Every process builds the same Llama (literal sizes below, ~16M parameters, tied
embeddings), wraps it as keel's engine does (DDP: DistributedDataParallel, what accelerate's prepare gives on CPU;
FSDP: keel.train.sharded.shard, each block then the root), and trains with keel's optimiser (fused AdamW) and
gradient clipping on random tokens. After a few warm-up steps the kernel's peak-RSS mark (VmHWM) is reset, so the
peak is that of training (weights, gradients, optimiser state, activations, gathered blocks), not of loading.

    python benchmarks/fsdp_vs_ddp.py                      # 2 rounds, 20 timed steps each
    python benchmarks/fsdp_vs_ddp.py --rounds 3 --steps 30

Prints a table and writes benchmarks/results/fsdp_vs_ddp-cpu.json (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]

# the model: a small Llama (the shape of SmolLM2's family, scaled down)
CONFIG = dict(
    vocab_size=49152,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)
BATCH, SEQ, WARMUP = 8, 128, 3  # per process


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(strategy: str, steps: int, reshard: bool) -> None:
    """One process of the run (under torchrun): build, wrap, train ``steps`` timed steps, report."""
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from keel.recipe.parallel import ParallelConfig
    from keel.train.sharded import shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    n_params = sum(p.numel() for p in model.parameters())
    if strategy == "fsdp":
        model = shard(model, ParallelConfig(strategy="fsdp", reshard_after_forward=reshard), torch.device("cpu"))
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(rank)
    times = []
    for i in range(WARMUP + steps):
        if i == WARMUP:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark: training only from here
            base = _rss_mb("VmRSS")
        ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=g)  # (B, T)
        dist.barrier()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    row = {
        "rank": rank,
        "step_seconds_median": round(statistics.median(times), 4),
        "peak_rss_mb": round(_rss_mb("VmHWM"), 1),
        "rss_at_start_mb": round(base, 1),
        "parameters": n_params,
    }
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if rank == 0:
        print("RESULT " + json.dumps(rows), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def launch(strategy: str, steps: int, reshard: bool) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(port), __file__, "--worker", strategy, "--steps", str(steps)]
    cmd += [] if reshard else ["--no-reshard"]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"fsdp_vs_ddp: the {strategy} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="rounds per strategy, alternating the order")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run (after warm-up)")
    p.add_argument("--worker", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    p.add_argument("--no-reshard", action="store_true", help="fsdp: keep gathered weights after forward")
    p.add_argument("--out", type=Path, default=RESULTS / "fsdp_vs_ddp-cpu.json")
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, not args.no_reshard)

    import torch

    rows = []
    for r in range(args.rounds):
        for strategy in ("ddp", "fsdp") if r % 2 == 0 else ("fsdp", "ddp"):
            per_rank = launch(strategy, args.steps, not args.no_reshard)
            row = {
                "round": r + 1,
                "strategy": strategy,
                "step_seconds": max(x["step_seconds_median"] for x in per_rank),  # the slowest process sets the pace
                "peak_rss_mb_per_process": [x["peak_rss_mb"] for x in per_rank],
                "rss_at_start_mb_per_process": [x["rss_at_start_mb"] for x in per_rank],
            }
            rows.append(row)
            print(
                f"round {r + 1} {strategy}: {row['step_seconds']} s/step, peak RSS {row['peak_rss_mb_per_process']} MB",
                file=sys.stderr,
                flush=True,
            )
    summary = {}
    for strategy in ("ddp", "fsdp"):
        mine = [x for x in rows if x["strategy"] == strategy]
        summary[strategy] = {
            "step_seconds_best": min(x["step_seconds"] for x in mine),
            "peak_rss_mb_max": max(max(x["peak_rss_mb_per_process"]) for x in mine),
            "training_memory_mb_max": round(
                max(
                    max(p - s for p, s in zip(x["peak_rss_mb_per_process"], x["rss_at_start_mb_per_process"]))
                    for x in mine
                ),
                1,
            ),
        }
    result = {
        "benchmark": "fsdp_vs_ddp",
        "model": {**CONFIG, "parameters": per_rank[0]["parameters"]},
        "processes": 2,
        "batch_per_process": BATCH,
        "sequence_length": SEQ,
        "timed_steps": args.steps,
        "reshard_after_forward": not args.no_reshard,
        "rounds": rows,
        "summary": summary,
        "fsdp_over_ddp_step_time": round(summary["fsdp"]["step_seconds_best"] / summary["ddp"]["step_seconds_best"], 3),
        "fsdp_over_ddp_peak_rss": round(summary["fsdp"]["peak_rss_mb_max"] / summary["ddp"]["peak_rss_mb_max"], 3),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "load_average": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'strategy':<8} {'s/step (best)':>14} {'peak RSS MB (max)':>18} {'training MB (max)':>18}")
    for strategy, s in summary.items():
        print(
            f"{strategy:<8} {s['step_seconds_best']:>14} {s['peak_rss_mb_max']:>18} {s['training_memory_mb_max']:>18}"
        )
    print(f"fsdp/ddp: step time {result['fsdp_over_ddp_step_time']}x, peak RSS {result['fsdp_over_ddp_peak_rss']}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
