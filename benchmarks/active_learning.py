"""Active learning with a simulated oracle on the tweets: test accuracy against the number of labels for each
strategy of `keel label` and for random sampling (the same strategies and linear probe, keel/label/).

    .venv/bin/python benchmarks/active_learning.py                       # pool 3,000, val 1,000, test 1,000, 5 seeds
    .venv/bin/python benchmarks/active_learning.py --run runs/quickstart  # also put the curve in that run's report

Embeddings: frozen MiniLM (mean-pooled), computed once and cached (benchmarks/_tweets_probe.py); each round refits a
logistic regression on the labels so far. Every choice is made on the validation split (1,000 tweets apart from the
pool and the test set): first the probe's regularisation (a fixed C, or C cross-validated on the labelled texts
alone), by random sampling's mean validation accuracy over the curve; then, with that probe, every strategy with a
random and a TypiClust cold start, and keel's default is the one that reaches random sampling's final validation
accuracy with the fewest labels. The test curves, written beside, are read once for the table and the report.
Writes benchmarks/results/active-learning-cpu.json.
Goal (issue 19): random sampling's final accuracy with at most half the labels; anchor: small-text's curves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # small fits: threads only contend on a shared machine

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _tweets_probe import LABELS, embed_cached, tweets  # noqa: E402

from keel.label.simulate import learning_curve  # noqa: E402
from keel.label.strategies import STRATEGIES  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PROBE_CS = ("1.0", "3.0", "10.0", "cv")  # the probe's C candidates (cv: cross-validated on the labelled texts only)
COLD_STARTS = ("random", "typiclust")


def _curves(data, strategy, cold_start, c, args) -> list[dict]:
    """Mean and std over seeds of each point's validation and test accuracy."""
    x_pool, y_pool, evals = data
    c = c if c == "cv" else float(c)
    runs = [
        learning_curve(
            x_pool, y_pool, evals, strategy, len(LABELS), args.start, args.batch, args.budget, s, cold_start, c
        )
        for s in range(args.seeds)
    ]
    return [
        {"labels": pts[0]["labels"]}
        | {f"{e}": round(float(np.mean([p[e] for p in pts])), 4) for e in evals}
        | {f"{e}_std": round(float(np.std([p[e] for p in pts])), 4) for e in evals}
        for pts in zip(*runs)
    ]


def labels_to_reach(curve: list[dict], target: float, split: str) -> int | None:
    """The fewest labels after which the mean curve stays at or above ``target`` (None: not within the budget)."""
    for i, p in enumerate(curve):
        if all(q[split] >= target for q in curve[i:]):
            return p["labels"]
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", type=int, default=3000)
    ap.add_argument("--val", type=int, default=1000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--start", type=int, default=20)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--budget", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated subset (default: all)")
    ap.add_argument("--run", help="a run directory: write the curves to RUN/labels/simulation.json, rebuild its report")
    args = ap.parse_args()

    t0 = time.perf_counter()
    # pool and test are the first 4,000 of the seeded sample (as before the validation split was added)
    texts, y = tweets(args.pool + args.test + args.val, seed=0)
    x = embed_cached(texts)
    embed_s = time.perf_counter() - t0
    p, t = args.pool, args.pool + args.test
    data = (x[:p], y[:p], {"val": (x[t:], y[t:]), "test": (x[p:t], y[p:t])})

    # 1. the probe's regularisation, on random sampling's validation curve
    probe_runs = {c: _curves(data, "random", "random", c, args) for c in PROBE_CS}
    probe_auc = {c: round(float(np.mean([q["val"] for q in cur])), 4) for c, cur in probe_runs.items()}
    c = max(PROBE_CS, key=lambda k: probe_auc[k])
    print(f"probe C by random sampling's mean validation accuracy: {probe_auc} -> {c}")

    # 2. every strategy and cold start with that probe; random sampling (random start) is the baseline
    curves = {}
    for strategy in args.strategies.split(","):
        for cold in COLD_STARTS:
            name = strategy if cold == "random" else f"{strategy} (typiclust start)"
            curves[name] = probe_runs[c] if (strategy, cold) == ("random", "random") else None
            if curves[name] is None:
                t1 = time.perf_counter()
                curves[name] = _curves(data, strategy, cold, c, args)
                print(f"  {name}: {time.perf_counter() - t1:.0f} s", flush=True)
    target = {s: curves["random"][-1][s] for s in ("val", "test")}
    reach = {
        s: {name: labels_to_reach(cur, target[s], s) for name, cur in curves.items() if name != "random"}
        for s in ("val", "test")
    }
    never = args.budget + args.batch
    chosen = min(reach["val"], key=lambda n: (reach["val"][n] or never, -np.mean([q["val"] for q in curves[n]])))
    full = _full_pool_accuracy(data, c)
    doc = {
        "data": "tweets-sentiment",
        "setup": f"pool {args.pool}, validation {args.val}, test {args.test}, frozen MiniLM + logistic regression "
        f"(C {c}), start {args.start}, batch {args.batch}, budget {args.budget}",
        "seeds": args.seeds,
        "embed_seconds": round(embed_s, 1),
        "probe_c_candidates_val_mean_accuracy": probe_auc,
        "probe_c": c,
        "chosen_on_validation": chosen,
        "curves": {
            name: [{"labels": q["labels"], "accuracy": q["test"], "std": q["test_std"]} for q in cur]
            for name, cur in curves.items()
        },
        "validation_curves": {
            name: [{"labels": q["labels"], "accuracy": q["val"], "std": q["val_std"]} for q in cur]
            for name, cur in curves.items()
        },
        "random_final_accuracy": target["test"],
        "random_final_validation_accuracy": target["val"],
        "labels_to_match_random": reach["test"],
        "labels_to_match_random_validation": reach["val"],
        "whole_pool_labelled_accuracy": round(full, 4),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "active-learning-cpu.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    heads = [q["labels"] for q in curves["random"][::4]]
    print(f"{'strategy (test accuracy)':34} " + " ".join(f"{h:>6}" for h in heads) + "   to match random: val  test")
    for name, cur in curves.items():
        row = " ".join(f"{q['test']:6.3f}" for q in cur[::4])
        print(f"{name:34} {row}   {str(reach['val'].get(name, '-')):>20} {str(reach['test'].get(name, '-')):>5}")
    print(f"chosen on validation: {chosen}; whole pool labelled ({args.pool}): {full:.3f}; wrote {out}")
    if args.run:
        from keel.io import atomic_write_json
        from keel.report import write_report

        run = Path(args.run)
        (run / "labels").mkdir(exist_ok=True)
        atomic_write_json(run / "labels" / "simulation.json", doc)
        print(f"report: {write_report(run)}")


def _full_pool_accuracy(data, c) -> float:
    from keel.label.probe import Probe

    x_pool, y_pool, evals = data
    return Probe(len(LABELS), c=c if c == "cv" else float(c)).fit(x_pool, y_pool).accuracy(*evals["test"])


if __name__ == "__main__":
    main()
