"""Active learning with a simulated oracle on the tweets: test accuracy against the number of labels for each
strategy of `keel label` and for random sampling (the same strategies and linear probe, keel/label/).

    .venv/bin/python benchmarks/active_learning.py                       # pool 3,000, test 1,000, 400 labels, 3 seeds
    .venv/bin/python benchmarks/active_learning.py --run runs/quickstart  # also put the curve in that run's report

Embeddings: frozen MiniLM (mean-pooled), computed once; each round refits a logistic regression on the labels so
far. Nothing is chosen on the test set (fixed settings). Writes benchmarks/results/active-learning-cpu.json.
Goal (issue 19): random sampling's final accuracy with at most half the labels; anchor: small-text's curves.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _tweets_probe import LABELS, embed_all, encoder, tweets  # noqa: E402

from keel.label.simulate import learning_curve  # noqa: E402
from keel.label.strategies import STRATEGIES  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", type=int, default=3000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--start", type=int, default=20)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--budget", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--run", help="a run directory: write the curves to RUN/labels/simulation.json, rebuild its report")
    args = ap.parse_args()

    t0 = time.perf_counter()
    texts, y = tweets(args.pool + args.test, seed=0)
    x = embed_all(texts, encoder())
    embed_s = time.perf_counter() - t0
    x_pool, y_pool, x_test, y_test = x[: args.pool], y[: args.pool], x[args.pool :], y[args.pool :]
    curves = {}
    for strategy in STRATEGIES:
        runs = [
            learning_curve(
                x_pool, y_pool, x_test, y_test, strategy, len(LABELS), args.start, args.batch, args.budget, s
            )
            for s in range(args.seeds)
        ]
        curves[strategy] = [
            {
                "labels": pts[0]["labels"],
                "accuracy": round(float(np.mean([p["accuracy"] for p in pts])), 4),
                "std": round(float(np.std([p["accuracy"] for p in pts])), 4),
            }
            for pts in zip(*runs)
        ]
    target = curves["random"][-1]["accuracy"]
    to_match = {
        s: next((p["labels"] for p in c if p["accuracy"] >= target), None) for s, c in curves.items() if s != "random"
    }
    full = _full_pool_accuracy(x_pool, y_pool, x_test, y_test)
    doc = {
        "data": "tweets-sentiment",
        "setup": f"pool {args.pool}, test {args.test}, frozen MiniLM + logistic regression, start {args.start} random, "
        f"batch {args.batch}, budget {args.budget}",
        "seeds": args.seeds,
        "embed_seconds": round(embed_s, 1),
        "curves": curves,
        "random_final_accuracy": target,
        "labels_to_match_random": to_match,
        "whole_pool_labelled_accuracy": round(full, 4),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "active-learning-cpu.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(
        f"{'strategy':18} " + " ".join(f"{p['labels']:>6}" for p in curves["random"][::4]) + "   labels to match random"
    )
    for s, c in curves.items():
        print(f"{s:18} " + " ".join(f"{p['accuracy']:6.3f}" for p in c[::4]) + f"   {to_match.get(s, '-')}")
    print(f"whole pool labelled ({args.pool}): {full:.3f}; wrote {out}")
    if args.run:
        from keel.io import atomic_write_json
        from keel.report import write_report

        run = Path(args.run)
        (run / "labels").mkdir(exist_ok=True)
        atomic_write_json(run / "labels" / "simulation.json", doc)
        print(f"report: {write_report(run)}")


def _full_pool_accuracy(x_pool, y_pool, x_test, y_test) -> float:
    from keel.label.probe import Probe

    return Probe(len(LABELS)).fit(x_pool, y_pool).accuracy(x_test, y_test)


if __name__ == "__main__":
    main()
