"""Active learning with a simulated oracle on the tweets: accuracy against the number of labels for each strategy
of `keel label` and for random sampling (the same strategies and linear probe, keel/label/).

    .venv/bin/python benchmarks/active_learning.py                       # pool 3,000, val 1,000, test 1,000, 5 seeds
    .venv/bin/python benchmarks/active_learning.py --run runs/quickstart  # also put the curve in that run's report

Embeddings: frozen MiniLM (mean-pooled), computed once and cached (benchmarks/_tweets_probe.py); each round refits a
logistic regression on the labels so far. The protocol, fixed before any result was looked at: a start of 20
labels, batches of 20 (small-text's experiments and the AL literature query tens at a time), and two budgets, 400
(the issue's) and 1,000 (the top of the literature's few-hundred-to-1,000 range; a third of the pool); the goal is
read at each: random sampling's accuracy at the budget with at most half of it.
Every choice is made on the validation split (1,000 tweets apart from the pool and the test set), in order:
  1. the probe's C (1, 3, 10, or cross-validated on the labelled texts alone), by random sampling's mean validation
     accuracy over the curve; then, with that C, its semi-supervised fit (none, label spreading, self-training on
     the pool; keel/label/semi.py), the same way: every arm, random included, uses the probe chosen here;
  2. every strategy after every cold start (random, TypiClust, ProbCover); keel's default is the arm that reaches
     random sampling's validation accuracy at the first budget with the fewest labels (ties: the higher mean).
The test split is read once, after those choices: the same probes are refitted on the same labels and scored on
it (keel/label/simulate.py's score_rounds), and printed beside the validation figures.
Writes benchmarks/results/active-learning-cpu.json. Goal (issue 19): random sampling's final accuracy with at most
half the labels; anchor: small-text's learning curves.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # small fits: threads only contend on a shared machine

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _tweets_probe import LABELS, embed_cached, tweets  # noqa: E402

from keel.label.semi import SEMI  # noqa: E402
from keel.label.simulate import score_rounds, simulate  # noqa: E402
from keel.label.strategies import STRATEGIES  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PROBE_CS = ("1.0", "3.0", "10.0", "cv")  # the probe's C candidates (cv: cross-validated on the labelled texts only)
COLD_STARTS = ("random", "typiclust", "probcover")  # probcover and typiclust need no label to pick the start
T_975 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 10: 2.26}  # Student's t, two-sided 95%

_DATA: dict = {}  # each worker's copy of the embeddings (set by _init)


def _init(data) -> None:
    _DATA["d"] = data


def _c(c: str) -> float | str:
    return c if c == "cv" else float(c)


def _simulate_job(job):
    strategy, cold, c, semi, seed, start, batch, budget = job
    x_pool, y_pool, evals = _DATA["d"]
    return simulate(
        x_pool, y_pool, {"val": evals["val"]}, strategy, len(LABELS), start, batch, budget, seed, cold, _c(c), semi
    )


def _test_job(job):
    order, counts, c, semi, seed = job
    x_pool, y_pool, evals = _DATA["d"]
    return score_rounds(x_pool, y_pool, order, counts, *evals["test"], len(LABELS), seed, _c(c), semi)


def _summary(per_seed: list[list[float]], counts: list[int]) -> list[dict]:
    """Mean and 95% confidence half-width across seeds (Student's t) of each point."""
    a = np.array(per_seed)  # (seeds, points)
    n = len(a)
    half = T_975.get(n, 1.96) * a.std(0, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(a.shape[1])
    return [
        {"labels": k, "accuracy": round(float(m), 4), "ci95": round(float(h), 4)}
        for k, m, h in zip(counts, a.mean(0), half)
    ]


def labels_to_reach(curve: list[dict], target: float, budget: int) -> int | None:
    """The fewest labels after which the mean curve stays at or above ``target`` up to ``budget`` (None: never)."""
    upto = [p for p in curve if p["labels"] <= budget]
    for i, p in enumerate(upto):
        if all(q["accuracy"] >= target for q in upto[i:]):
            return p["labels"]
    return None


def _at(curve: list[dict], labels: int) -> dict:
    return next(p for p in curve if p["labels"] == labels)


def _mean_upto(curve: list[dict], budget: int) -> float:
    return float(np.mean([p["accuracy"] for p in curve if p["labels"] <= budget]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", type=int, default=3000)
    ap.add_argument("--val", type=int, default=1000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--start", type=int, default=20)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--budgets", default="400,1000", help="comma-separated; the first decides keel's default")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated subset (default: all)")
    ap.add_argument("--starts", default=",".join(COLD_STARTS), help="cold starts, comma-separated")
    ap.add_argument("--probe-cs", default=",".join(PROBE_CS), help="the probe's C candidates (cv: cross-validated)")
    ap.add_argument("--semi", default=",".join(SEMI), help="the probe's semi-supervised fits to choose from")
    ap.add_argument("--workers", type=int, default=2, help="processes (one core each)")
    ap.add_argument("--run", help="a run directory: write the curves to RUN/labels/simulation.json, rebuild its report")
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    top = max(budgets)

    t0 = time.perf_counter()
    # pool and test are the first 4,000 of the seeded sample (as before the validation split was added)
    texts, y = tweets(args.pool + args.test + args.val, seed=0)
    x = embed_cached(texts)
    embed_s = time.perf_counter() - t0
    p, t = args.pool, args.pool + args.test
    data = (x[:p], y[:p], {"val": (x[t:], y[t:]), "test": (x[p:t], y[p:t])})
    pool = ProcessPoolExecutor(args.workers, initializer=_init, initargs=(data,))
    runs: dict[tuple, list] = {}  # (strategy, cold, c, semi) -> [(order, val curve)] per seed

    def run_arms(arms: list[tuple]) -> None:
        todo = [a for a in arms if a not in runs]
        jobs = [a + (s, args.start, args.batch, top) for a in todo for s in range(args.seeds)]
        results = list(pool.map(_simulate_job, jobs))
        for i, a in enumerate(todo):
            runs[a] = results[i * args.seeds : (i + 1) * args.seeds]

    def val_curve(arm) -> list[dict]:
        pts = runs[arm]
        return _summary([[q["val"] for q in cur] for _, cur in pts], [q["labels"] for q in pts[0][1]])

    # 1. the probe: C, then its semi-supervised fit, by random sampling's mean validation accuracy
    cs = args.probe_cs.split(",")
    run_arms([("random", "random", c, "none") for c in cs])
    probe_c = {c: round(_mean_upto(val_curve(("random", "random", c, "none")), top), 4) for c in cs}
    c = max(cs, key=lambda k: probe_c[k])
    semis = args.semi.split(",")
    run_arms([("random", "random", c, s) for s in semis])
    probe_semi = {s: round(_mean_upto(val_curve(("random", "random", c, s)), top), 4) for s in semis}
    semi = max(semis, key=lambda k: probe_semi[k])
    print(f"probe C by random sampling's mean validation accuracy: {probe_c} -> {c}", flush=True)
    print(f"probe's semi-supervised fit, the same way: {probe_semi} -> {semi}", flush=True)

    # 2. every strategy after every cold start, with that probe; random sampling (random start) is the baseline
    names: dict[str, tuple] = {"random": ("random", "random", c, semi)}
    for strategy in args.strategies.split(","):
        for cold in args.starts.split(",") if strategy not in ("random", *COLD_STARTS) else ["random"]:
            names[strategy if cold == "random" else f"{strategy} ({cold} start)"] = (strategy, cold, c, semi)
    t1 = time.perf_counter()
    run_arms(list(names.values()))
    print(f"{len(names)} arms x {args.seeds} seeds: {time.perf_counter() - t1:.0f} s", flush=True)
    val = {name: val_curve(arm) for name, arm in names.items()}
    never = top + args.batch
    reach_val, chosen = {}, {}
    for b in budgets:
        target = _at(val["random"], b)["accuracy"]
        reach_val[b] = {n: labels_to_reach(cur, target, b) for n, cur in val.items() if n != "random"}
        chosen[b] = min(reach_val[b], key=lambda n: (reach_val[b][n] or never, -_mean_upto(val[n], b)))
    default = chosen[budgets[0]]
    # each strategy's start, chosen on validation too: the curves the report plots
    best_start = {}
    for strategy in dict.fromkeys(arm[0] for arm in names.values()):
        mine = [n for n in names if names[n][0] == strategy]
        best_start[strategy] = min(
            mine, key=lambda n: (reach_val[budgets[0]].get(n) or never, -_mean_upto(val[n], top))
        )

    # 3. the test split, read once: the same probes on the same labels
    counts = [q["labels"] for q in runs[names["random"]][0][1]]
    jobs = [(order, counts, c, semi, s) for arm in names.values() for s, (order, _) in enumerate(runs[arm])]
    scores = list(pool.map(_test_job, jobs))
    pool.shutdown()
    test = {n: _summary(scores[i * args.seeds : (i + 1) * args.seeds], counts) for i, n in enumerate(names)}
    reach_test = {}
    for b in budgets:
        target = _at(test["random"], b)["accuracy"]
        reach_test[b] = {n: labels_to_reach(cur, target, b) for n, cur in test.items() if n != "random"}
    full = _full_pool_accuracy(data, c)

    plotted = [best_start[s] for s in best_start]
    doc = {
        "data": "tweets-sentiment",
        "setup": f"pool {args.pool}, validation {args.val}, test {args.test}, frozen MiniLM + logistic regression "
        f"(C {c}, semi-supervised fit: {semi}), start {args.start}, batch {args.batch}, budgets {budgets}",
        "seeds": args.seeds,
        "embed_seconds": round(embed_s, 1),
        "probe_c_candidates_val_mean_accuracy": probe_c,
        "probe_c": c,
        "probe_semi_candidates_val_mean_accuracy": probe_semi,
        "probe_semi": semi,
        "budgets": budgets,
        "chosen_on_validation": default,
        "chosen_on_validation_per_budget": {str(b): chosen[b] for b in budgets},
        "curves": {n: test[n] for n in plotted},  # the report's plot: each strategy after its validation-chosen start
        "validation_curves": {n: val[n] for n in plotted},
        "all_test_curves": test,
        "all_validation_curves": val,
        "random_accuracy_at_budget": {str(b): _at(test["random"], b)["accuracy"] for b in budgets},
        "random_validation_accuracy_at_budget": {str(b): _at(val["random"], b)["accuracy"] for b in budgets},
        # the first budget's, flat (the report's table), then every budget's
        "labels_to_match_random": reach_test[budgets[0]],
        "labels_to_match_random_validation": reach_val[budgets[0]],
        "labels_to_match_random_per_budget": {str(b): reach_test[b] for b in budgets},
        "labels_to_match_random_validation_per_budget": {str(b): reach_val[b] for b in budgets},
        "whole_pool_labelled_accuracy": round(full, 4),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "active-learning-cpu.json"
    from keel.io import atomic_write_json

    atomic_write_json(out, doc)
    _print_table(names, val, test, reach_val, reach_test, budgets, args.start)
    print(f"chosen on validation: {chosen}; whole pool labelled ({args.pool}): {full:.3f}; wrote {out}")
    if args.run:
        from keel.report import write_report

        run = Path(args.run)
        (run / "labels").mkdir(exist_ok=True)
        atomic_write_json(run / "labels" / "simulation.json", doc)
        print(f"report: {write_report(run)}")


def _print_table(names, val, test, reach_val, reach_test, budgets, start) -> None:
    points = sorted(k for k in {start, 100, 200, *budgets} if k <= max(budgets))
    head = " ".join(f"{'test@' + str(k):>13}" for k in points)
    reach = " ".join(f"{'val/test<=' + str(b):>14}" for b in budgets)
    print(f"{'strategy':36} {head}   labels to match random: {reach}")
    rows = sorted(names, key=lambda n: (n != "random", reach_val[budgets[0]].get(n) or 10**9))
    for n in rows:
        cells = " ".join(f"{_at(test[n], k)['accuracy']:.3f}+-{_at(test[n], k)['ci95']:.3f}" for k in points)
        r = " ".join(f"{str(reach_val[b].get(n, '-')) + '/' + str(reach_test[b].get(n, '-')):>14}" for b in budgets)
        print(f"{n:36} {cells}   {'':24}{r}")
    print("validation (the choices' basis), mean accuracy:")
    for n in rows:
        print(f"{n:36} " + " ".join(f"{_at(val[n], k)['accuracy']:.3f}+-{_at(val[n], k)['ci95']:.3f}" for k in points))


def _full_pool_accuracy(data, c) -> float:
    from keel.label.probe import Probe

    x_pool, y_pool, evals = data
    return Probe(len(LABELS), c=_c(c)).fit(x_pool, y_pool).accuracy(*evals["test"])


if __name__ == "__main__":
    main()
