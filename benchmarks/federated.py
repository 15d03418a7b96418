"""Federated learning figures: FedAvg vs centralized, the cost of SecAgg+, the accuracy gap of DP, and scale.

Every number comes from the real CLI (`keel run`, `keel federate`) in a fresh folder, on tweets-sentiment split
across 10 sites with label skew (Dirichlet alpha 0.5). Centralized training gets the same model and the same
budget of epochs (rounds x local epochs). Prints a table; writes benchmarks/results/federated-<model>-cpu.json.

    .venv/bin/python benchmarks/federated.py                          # tiny-bert: minutes on 2 cores
    .venv/bin/python benchmarks/federated.py --model minilm-l6 --samples 2000 --rounds 5
    .venv/bin/python benchmarks/federated.py --only scale --scale 10 100 1000 10000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

RECIPE = """
name: {name}
task: classification
model: {{name: {model}, max_length: 48}}
data:
  name: tweets-sentiment
  max_train_samples: {samples}
  max_eval_samples: 1000
  split: {{validation: 0.1, test: 0.1, seed: 0}}
train: {{batch_size: 16, lr: {lr}, warmup_ratio: 0.0, schedule: constant, epochs: {epochs}, max_grad_norm: 1.0}}
"""

FEDERATED = """
federated:
  sites: {sites}
  rounds: {rounds}
  local_epochs: 1
  local_optimizer: adamw
  partition: {{kind: dirichlet, alpha: 0.5, seed: 0}}
"""


def keel(args: list[str], cwd: Path) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "keel", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"keel {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def federated_row(work: Path, name: str, base: str, fed: str, overrides: list[str]) -> dict:
    path = work / f"{name}.yaml"
    path.write_text(base.replace("name: bench", f"name: {name}") + fed)
    wall = keel(["federate", str(path), *overrides], work)
    run = work / "runs" / name
    test = json.loads((run / "eval" / "test.json").read_text())
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    later = [r["seconds"] for r in rounds if r["round"] > 1]  # round 1 also pays for starting the site workers
    train = json.loads((run / "train.json").read_text())
    row = {
        "accuracy": test["accuracy"],
        "macro_f1": test["macro_f1"],
        "wall_seconds": round(wall, 1),
        "seconds_per_round": round(statistics.median(later), 2) if later else None,
        "first_round_seconds": rounds[1]["seconds"] if len(rounds) > 1 else None,
        "rounds_done": train["rounds_done"],
        "curve": [r.get("accuracy") for r in rounds],
    }
    if "privacy" in train:
        row["epsilon_spent"] = round(train["privacy"]["epsilon_spent"], 3)
        row["noise_multiplier"] = round(train["privacy"]["noise_multiplier"], 3)
        row["delta"] = train["privacy"]["delta"]
        row["noise_std"] = round(train["privacy"]["noise_std"], 5)
        row["rounds_with_noise"] = train["privacy"]["rounds_with_noise"]
    return row


def main(a) -> dict:
    out: dict = {
        "model": a.model,
        "samples": a.samples,
        "sites": 10,
        "rounds": a.rounds,
        "alpha": 0.5,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_at_start": os.getloadavg()[0]},
    }
    base = RECIPE.format(name="bench", model=a.model, samples=a.samples, lr=a.lr, epochs=a.rounds)
    fed = FEDERATED.format(sites=10, rounds=a.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ.setdefault("KEEL_CACHE_DIR", str(Path.home() / ".cache" / "keel"))
        if "accuracy" in a.only:
            (work / "central.yaml").write_text(base.replace("name: bench", "name: central"))
            wall = keel(["run", str(work / "central.yaml")], work)
            test = json.loads((work / "runs" / "central" / "eval" / "test.json").read_text())
            out["centralized"] = {
                "accuracy": test["accuracy"],
                "macro_f1": test["macro_f1"],
                "wall_seconds": round(wall, 1),
                "majority_baseline_accuracy": test["baseline"]["accuracy"],
            }
            out["fedavg"] = federated_row(work, "fedavg", base, fed, [])
            out["fedavg_vs_centralized_accuracy"] = round(out["fedavg"]["accuracy"] / out["centralized"]["accuracy"], 4)
        if "secagg" in a.only:
            out.setdefault("fedavg", federated_row(work, "fedavg", base, fed, []))
            out["secagg"] = federated_row(work, "secagg", base, fed, ["federated.secagg.enabled=true"])
            if out["fedavg"]["seconds_per_round"] and out["secagg"]["seconds_per_round"]:
                out["secagg_time_per_round_ratio"] = round(
                    out["secagg"]["seconds_per_round"] / out["fedavg"]["seconds_per_round"], 3
                )
        if "dp" in a.only:
            out.setdefault("fedavg", federated_row(work, "fedavg", base, fed, []))
            out["dp_eps8"] = federated_row(
                work,
                "dp",
                base,
                fed,
                ["federated.dp.mode=central", "federated.dp.epsilon=8", f"federated.dp.clipping_norm={a.clip}"],
            )
            out["dp_eps8_accuracy_gap"] = round(out["fedavg"]["accuracy"] - out["dp_eps8"]["accuracy"], 4)
            out["dp_local_eps8"] = federated_row(
                work,
                "dplocal",
                base,
                fed,
                ["federated.dp.mode=local", "federated.dp.epsilon=8", f"federated.dp.clipping_norm={a.clip}"],
            )
            out["dp_local_eps8_accuracy_gap"] = round(out["fedavg"]["accuracy"] - out["dp_local_eps8"]["accuracy"], 4)
        if "scale" in a.only:
            out["scale"] = []
            for n in a.scale:
                # a tiny model, 10 sites sampled per round, one local step: what grows is the number of sites
                samples = max(a.samples, 2 * n)
                scale_base = RECIPE.format(name="bench", model="tiny-bert", samples=samples, lr=a.lr, epochs=1)
                fed_n = FEDERATED.format(sites=n, rounds=2) + (
                    f"  fraction_fit: {min(1.0, 10 / n)}\n  min_fit_clients: 2\n"
                    "  local_steps: 1\n  partition: {kind: iid, seed: 0}\n"
                )
                fed_n = fed_n.replace("  partition: {kind: dirichlet, alpha: 0.5, seed: 0}\n", "", 1)
                t0 = time.perf_counter()
                try:
                    row = federated_row(work, f"scale{n}", scale_base, fed_n, [])
                except SystemExit as e:
                    out["scale"].append({"sites": n, "ok": False, "error": str(e)[-300:]})
                    break
                out["scale"].append(
                    {
                        "sites": n,
                        "ok": True,
                        "wall_seconds": round(time.perf_counter() - t0, 1),
                        "seconds_per_round": row["seconds_per_round"],
                        "peak_rss_mb_children": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
                    }
                )
    return out


def table(out: dict) -> None:
    print(
        f"\nfederated figures: {out['model']}, tweets-sentiment, {out['samples']} training tweets, 10 sites, "
        f"Dirichlet alpha 0.5, {out['rounds']} rounds (load average at start {out['machine']['load_avg_at_start']:.1f})"
    )
    print(f"{'setting':<28}{'test acc':>10}{'macro-F1':>10}{'s/round':>10}{'wall s':>9}{'epsilon':>9}")
    for key in ("centralized", "fedavg", "secagg", "dp_eps8", "dp_local_eps8"):
        r = out.get(key)
        if r:
            print(
                f"{key:<28}{r['accuracy']:>10.4f}{r['macro_f1']:>10.4f}{str(r.get('seconds_per_round', '-')):>10}"
                f"{r['wall_seconds']:>9.1f}{str(r.get('epsilon_spent', '-')):>9}"
            )
    for k in (
        "fedavg_vs_centralized_accuracy",
        "secagg_time_per_round_ratio",
        "dp_eps8_accuracy_gap",
        "dp_local_eps8_accuracy_gap",
    ):
        if k in out:
            print(f"{k}: {out[k]}")
    for r in out.get("scale", []):
        print(
            f"scale: {r['sites']} simulated sites: "
            + (
                f"ok, {r['seconds_per_round']} s/round, wall {r['wall_seconds']} s"
                if r["ok"]
                else f"failed: {r['error']}"
            )
        )


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny-bert")
    p.add_argument("--samples", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip", type=float, default=1.0, help="DP clipping norm of a site's update")
    p.add_argument("--only", nargs="+", default=["accuracy", "secagg", "dp", "scale"])
    p.add_argument("--scale", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--tag", default="")
    args = p.parse_args()
    result = main(args)
    table(result)
    RESULTS.mkdir(exist_ok=True)
    name = f"federated-{args.model}{'-' + args.tag if args.tag else ''}-cpu.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / name}")
