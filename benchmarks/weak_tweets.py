"""Weak supervision on the tweets, end to end: keel's built-in labelling functions (keel/data/weak_tweets.py) label
3,000 tweets whose real labels are hidden; Snorkel's label model and majority vote combine the votes; the same end
model trains on each set of labels and on the real ones, and is scored on 1,000 test tweets.

    .venv/bin/python benchmarks/weak_tweets.py

The end model is the frozen-MiniLM probe (a logistic regression on mean-pooled embeddings, cached as in
benchmarks/active_learning.py, the same 5,000-tweet sample), not the weak-tweets recipe's full fine-tune: two epochs
of MiniLM on 2,400 tweets take tens of minutes on two shared cores, and the comparison between label sources is
the point. Every choice is made on a validation split (1,000 tweets, real labels): the label model's settings
(class balance learned or the validation labels' prior; epochs, learning rate, L2; fitted on every row or on the
rows some function voted on), the probe's C for each label source, and which combiner keel should default to.
The test set is scored once, at the end. Writes benchmarks/results/weak-tweets-cpu.json.
Anchor (issue 19): Snorkel's spam tutorial, majority vote 84.2%, label model 88.3%, end model 92.8%.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # small fits: threads only contend on a shared machine

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _tweets_probe import LABELS, embed_cached, tweets  # noqa: E402

from keel.data import weak  # noqa: E402

RESULTS = Path(__file__).parent / "results"
END_CS = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
GRID = {
    "class_balance": ("learned", "validation prior"),
    "n_epochs": (100, 500, 2000),
    "lr": (0.01, 0.001),
    "l2": (0.0, 0.1),
    "fit_rows": ("all", "covered"),
}


def label_model(L_train, L_eval, cfg: dict, prior, seed: int = 0):
    """(hard labels of L_eval, -1 where no function voted; probabilities (N, K)) from a LabelModel fitted on
    L_train alone (no gold label is used)."""
    from snorkel.labeling.model import LabelModel

    fit_on = L_train if cfg["fit_rows"] == "all" else L_train[(L_train != weak.ABSTAIN).any(1)]
    lm = LabelModel(cardinality=len(LABELS), verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm.fit(
            fit_on,
            n_epochs=cfg["n_epochs"],
            lr=cfg["lr"],
            l2=cfg["l2"],
            seed=seed,
            class_balance=list(prior) if cfg["class_balance"] == "validation prior" else None,
            progress_bar=False,
        )
        probs = lm.predict_proba(L_eval)  # (N, K)
    covered = (L_eval != weak.ABSTAIN).any(1)
    return np.where(covered, probs.argmax(1), weak.ABSTAIN), probs


def majority(L):
    from snorkel.labeling.model import MajorityLabelVoter

    return MajorityLabelVoter(cardinality=len(LABELS)).predict(L, tie_break_policy="abstain")


def end_model(x, y, x_val, y_val, c=None, weights=None):
    """(validation accuracy, fitted LogisticRegression); C chosen on validation when not given."""
    from sklearn.linear_model import LogisticRegression

    best = None
    for cc in END_CS if c is None else (c,):
        m = LogisticRegression(max_iter=2000, C=cc, random_state=0).fit(x, y, sample_weight=weights)
        acc = float((m.predict(x_val) == y_val).mean())
        if best is None or acc > best[0]:
            best = (acc, m, cc)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--val", type=int, default=1000)
    ap.add_argument("--test", type=int, default=1000)
    args = ap.parse_args()
    t0 = time.perf_counter()
    texts, y = tweets(args.train + args.test + args.val, seed=0)  # the active-learning sample and its cache
    p, t = args.train, args.train + args.test
    tr, te, va = slice(0, p), slice(p, t), slice(t, None)
    fns = weak.load_functions("tweets-sentiment")
    L = weak.apply_functions(fns, texts, LABELS)  # (N, M)
    L_tr, L_va = L[tr], L[va]
    prior = np.bincount(y[va], minlength=len(LABELS)) / len(y[va])

    # 1. the label model's settings, by the accuracy of its labels on the validation texts it covers
    trials = []
    for values in itertools.product(*GRID.values()):
        cfg = dict(zip(GRID, values))
        pred, _ = label_model(L_tr, L_va, cfg, prior)
        trials.append(cfg | weak.score(pred, y[va]))
    usual = {"class_balance": "learned", "n_epochs": 500, "lr": 0.01, "l2": 0.0, "fit_rows": "all"}  # keel's before
    best = max(trials, key=lambda r: r["accuracy"])
    tuned = {k: best[k] for k in GRID}
    mv_val = weak.score(majority(L_va), y[va])
    usual_val = next(r for r in trials if all(r[k] == usual[k] for k in GRID))
    print(
        f"validation: majority vote {mv_val['accuracy']:.3f} (coverage {mv_val['coverage']:.3f}); label model "
        f"with the usual settings {usual_val['accuracy']:.3f}, best of {len(trials)} {best['accuracy']:.3f} ({tuned})"
    )
    from keel.recipe.label import WeakConfig

    d = WeakConfig(functions="tweets-sentiment")
    keel_defaults = {
        "class_balance": {"validation": "validation prior"}.get(d.class_balance, d.class_balance),
        "n_epochs": d.epochs,
        "lr": d.lr,
        "l2": d.l2,
        "fit_rows": "all",
    }
    auto = "label model" if best["accuracy"] > mv_val["accuracy"] else "majority vote"
    print(
        f"keel's data.weak defaults {'are' if keel_defaults == tuned else 'are NOT'} these; auto would train on {auto}"
    )

    # 2. labels for the training texts from each source, scored against their hidden real labels
    lm_usual, _ = label_model(L_tr, L_tr, usual, prior)
    lm_tuned, probs_tuned = label_model(L_tr, L_tr, tuned, prior)
    sources = {
        "majority vote": majority(L_tr),
        "label model (usual settings)": lm_usual,
        "label model (tuned on validation)": lm_tuned,
    }
    x = embed_cached(texts)
    embed_s = time.perf_counter() - t0
    x_tr, x_va, x_te = x[tr], x[va], x[te]
    rows = {}
    for name, pred in sources.items():
        keep = pred != weak.ABSTAIN
        val_acc, model, c = end_model(x_tr[keep], pred[keep], x_va, y[va])
        rows[name] = {
            "labels": weak.score(pred, y[tr]) | {"kept": int(keep.sum())},
            "end_model": {"C": c, "val_accuracy": round(val_acc, 4), "test_accuracy": None},
            "_model": model,
        }
    # the label model's probabilities as weights (Snorkel's noise-aware end model) on the rows some function covered
    keep = lm_tuned != weak.ABSTAIN
    k = len(LABELS)
    xs, ys, ws = np.repeat(x_tr[keep], k, 0), np.tile(np.arange(k), keep.sum()), probs_tuned[keep].reshape(-1)
    val_acc, model, c = end_model(xs, ys, x_va, y[va], weights=ws)
    rows["label model probabilities (tuned)"] = {
        "labels": rows["label model (tuned on validation)"]["labels"],
        "end_model": {"C": c, "val_accuracy": round(val_acc, 4), "test_accuracy": None},
        "_model": model,
    }
    for name, keep in (("gold, the same covered texts", lm_tuned != weak.ABSTAIN), ("gold, every text", slice(None))):
        val_acc, model, c = end_model(x_tr[keep], y[tr][keep], x_va, y[va])
        n = int(np.ones(p, bool)[keep].sum())
        rows[name] = {
            "labels": {"accuracy": 1.0, "coverage": n / p, "n": n, "kept": n},
            "end_model": {"C": c, "val_accuracy": round(val_acc, 4), "test_accuracy": None},
            "_model": model,
        }
    # 3. the test set, once
    for r in rows.values():
        r["end_model"]["test_accuracy"] = round(float((r.pop("_model").predict(x_te) == y[te]).mean()), 4)
    weak_names = [n for n in rows if not n.startswith("gold")]
    chosen = max(weak_names, key=lambda n: rows[n]["end_model"]["val_accuracy"])
    doc = {
        "data": "tweets-sentiment",
        "setup": f"{p} training tweets (real labels hidden), validation {args.val}, test {args.test}; "
        f"{len(fns)} built-in labelling functions; end model: logistic regression on frozen MiniLM embeddings",
        "functions": weak.analyse(L_tr, fns, y[tr]),
        "label_model_validation": {
            "majority vote": mv_val,
            "usual settings": {k: usual_val[k] for k in ("accuracy", "coverage", "n")} | {"settings": usual},
            "best": {k: best[k] for k in ("accuracy", "coverage", "n")},
            "best_settings": tuned,
            "trials": trials,
        },
        "validation_prior": [round(float(v), 4) for v in prior],
        "sources": rows,
        "best_weak_source_on_validation": chosen,
        "keel_defaults": keel_defaults,
        "keel_defaults_are_the_best_on_validation": keel_defaults == tuned,
        "auto_trains_on": auto,
        "embed_seconds": round(embed_s, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "weak-tweets-cpu.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{'labels the end model trains on':38} {'kept':>5} {'label acc':>9} {'val acc':>8} {'test acc':>8}")
    for name, r in rows.items():
        e = r["end_model"]
        print(
            f"{name:38} {r['labels']['kept']:5d} {r['labels']['accuracy']:9.3f} {e['val_accuracy']:8.3f} "
            f"{e['test_accuracy']:8.3f}"
        )
    print(f"best weak source on validation: {chosen}; wrote {out}")


if __name__ == "__main__":
    main()
