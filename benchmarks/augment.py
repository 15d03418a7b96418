"""Augmentation: test accuracy with and without `data.augment` at 10%, 30% and 100% of the training data, on the
tweets (the issue's table).

    .venv/bin/python benchmarks/augment.py                      # train 1,000, test 1,000, 4 copies, 3 seeds
    .venv/bin/python benchmarks/augment.py --ops synonym insert swap delete typo --copies 8

The model is a logistic regression on frozen MiniLM embeddings (mean-pooled), so the table runs in minutes on a
CPU; the copies are the ones keel's data stage makes (keel/augment/text.py, EDA's alpha 0.1). Each seed draws a
different subset of the training texts; the test set and every setting are fixed (nothing is chosen on test).
Writes benchmarks/results/augment-cpu.json. Anchor: EDA (Wei & Zou 2019) matched full-data accuracy with half
the data, averaged over five tasks, with models trained end to end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _tweets_probe import LABELS, embed_all, encoder, tweets  # noqa: E402

from keel.augment.text import augment_texts  # noqa: E402
from keel.label.probe import Probe  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--ops", nargs="+", default=["synonym", "insert", "swap", "delete"])
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.3, 1.0])
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()

    t0 = time.perf_counter()
    texts, y = tweets(args.train + args.test, seed=1)
    train, y_train, test, y_test = texts[: args.train], y[: args.train], texts[args.train :], y[args.train :]
    cfg = SimpleNamespace(ops=args.ops, copies=args.copies, alpha=args.alpha, typo_rate=0.05, seed=0)
    copies, counts = augment_texts(train, cfg)  # copies of every training text, once; subsets take their own
    enc = encoder()
    x_all = embed_all(train + [t for _, t, _ in copies] + test, enc)
    x_train, x_copy, x_test = x_all[: len(train)], x_all[len(train) : len(train) + len(copies)], x_all[-len(test) :]
    src = np.array([i for i, _, _ in copies], dtype=np.int64)
    rows = []
    for frac in args.fractions:
        n = max(len(LABELS), round(frac * len(train)))
        base, aug = [], []
        for seed in range(args.seeds):
            pick = np.random.default_rng(seed).choice(len(train), size=n, replace=False)
            base.append(Probe(len(LABELS), seed).fit(x_train[pick], y_train[pick]).accuracy(x_test, y_test))
            mine = np.flatnonzero(np.isin(src, pick))
            x = np.concatenate([x_train[pick], x_copy[mine]])
            yy = np.concatenate([y_train[pick], y_train[src[mine]]])
            aug.append(Probe(len(LABELS), seed).fit(x, yy).accuracy(x_test, y_test))
        rows.append(
            {
                "fraction": frac,
                "train_texts": n,
                "without": round(float(np.mean(base)), 4),
                "without_std": round(float(np.std(base)), 4),
                "with": round(float(np.mean(aug)), 4),
                "with_std": round(float(np.std(aug)), 4),
                "gain_points": round(100 * (float(np.mean(aug)) - float(np.mean(base))), 2),
            }
        )
    doc = {
        "data": "tweets-sentiment",
        "model": "logistic regression on frozen MiniLM embeddings",
        "test_texts": len(test),
        "ops": args.ops,
        "copies": args.copies,
        "alpha": args.alpha,
        "copies_made": counts,
        "seeds": args.seeds,
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "augment-cpu.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{'train share':>11} {'texts':>6} {'without':>8} {'with':>8} {'gain':>7}")
    for r in rows:
        print(
            f"{r['fraction']:>11.0%} {r['train_texts']:>6} {r['without']:>8.4f} {r['with']:>8.4f} {r['gain_points']:>+6.2f}p"
        )
    print(f"wrote {out} ({doc['seconds']} s)")


if __name__ == "__main__":
    main()
