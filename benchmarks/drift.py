"""Simulated drift on the tweets: a topic the deployed model never saw comes back as feedback.

The tweets that mention one word (``--topic``, default google: 87% neutral, against 39% in the rest) are held back
from training. A MiniLM run trained on 1,600 of the other tweets (2 epochs, one thread) serves as the deployed
model; then the held-back tweets arrive as label feedback (their gold labels, written to the run's feedback
database as `POST /v1/feedback` would) in ``--rounds`` rounds of ``--per-round`` texts, each followed by one
`keel learn` round (keel.learn.loop.learn). Two
arms start from copies of the same base run and get the same feedback rows in the same order: with replay
(learn.replay=1: as many rows of the training split as feedback rows) and without (learn.replay=0). The promotion
gate is opened in both (learn.margin=-1, learn.max_old_drop=1) so that every challenger serves and the arms show
what replay does; the decision the default gate (margin 0.01, max_old_drop 0.01) would have made is recorded beside
each round.

After each round the served version is scored on the old test split (the run's frozen test split, no topic
tweets) and on a fixed test set of the new topic (held-back tweets never fed back). Nothing is tuned on these test
sets: the topic is the script's first default, the learning rate and epochs are the quickstart's (1e-4, 2).

    .venv/bin/python benchmarks/drift.py                        # 25 minutes on 2 busy cores (14 with the base cached)
    .venv/bin/python benchmarks/drift.py --run runs/quickstart  # also put the curves in that run's report

Why one thread: on the 2 cores shared with other processes (load ~15), a tiny-bert step took 0.24 s with 1 torch
thread and 3.1-3.9 s with 2 (the threads wait on each other), and a MiniLM step (batch 16) 1.4 s with 1; an
earlier attempt with 2 threads saw ~40 s MiniLM steps. The base
run is cached (keel's cache folder, keyed by its recipe and data), so a second run skips it; --no-cache retrains.

Writes benchmarks/results/drift-<device>.json and drift-<device>.svg (accuracy per round, both arms, both sets).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).parent / "results"
MODEL = "minilm-l6"

RECIPE = """
name: drift
task: classification
model: {{name: {model}, max_length: 64}}
data:
  path: {data}
  split: {{validation: 0.1, test: 0.15, seed: 0}}
  max_train_samples: {train}
  max_eval_samples: 300
train: {{epochs: 2, batch_size: 16, lr: 1.0e-4, num_threads: 1, seed: 0}}
serve: {{feedback: {{store_text: true}}}}
learn: {{epochs: 2, margin: -1.0, max_old_drop: 1.0, min_feedback: 8, holdout: 0.25}}
"""


def post_feedback(run_dir: Path, frame, version: str, round_no: int) -> None:
    """The texts and gold labels as label feedback rows, as the server stores them (keel/serve/feedback.py)."""
    from keel.rundir import feedback_db
    from keel.serve.feedback import FeedbackStore, sha256_text

    store = FeedbackStore(feedback_db(run_dir))

    async def send():
        for i, (text, label) in enumerate(zip(frame["text"], frame["label"])):
            await store.append(
                {
                    "created": time.time(),
                    "response_id": f"clf-drift-{round_no}-{i}",
                    "idx": 0,
                    "route": "classify",
                    "kind": "label",
                    "model_version": version,
                    "model_sha256": "",
                    "input_text": text,
                    "input_sha256": sha256_text(text),
                    "output_sha256": sha256_text(label),
                    "label": label,
                }
            )

    asyncio.run(send())
    store.close()


def scored(run: Path, round_no: int, decision: dict | None, old_test, new_test) -> dict:
    """The served version of ``run`` on the old test split and on the new slice's test set."""
    from keel.learn.loop import decide, score
    from keel.rundir import current_version, version_dir

    v = current_version(run)
    row = {
        "round": round_no,
        "version": v,
        "old_test_accuracy": score(version_dir(run, v), old_test)["accuracy"],
        "new_slice_accuracy": score(version_dir(run, v), new_test)["accuracy"],
    }
    if decision is not None:
        row["action"] = decision["action"]
    if decision is not None and "figures" in decision:  # a skipped round (too little feedback) has none
        figures = json.loads(json.dumps(decision["figures"]))
        row["default_gate"] = "promote" if decide(figures, 0.01, 0.01)[0] else "refuse"
        row["decision_figures"] = decision["figures"]
        row["rows"] = {k: decision["data"].get(k) for k in ("feedback_train", "feedback_heldout", "replay")}
    return row


def base_run(old, train_rows: int, cache: bool) -> tuple[Path, float]:
    """The deployed model: trained once per recipe and data (cached), or into a temporary folder."""
    from keel.io import cache_dir
    from keel.pipeline import train_run
    from keel.recipe import load_recipe

    csv = old.head(train_rows * 2).to_csv(index=False)  # more than the cap: the splits take their share
    text = RECIPE.format(model=MODEL, data="{data}", train=train_rows)
    key = hashlib.sha256((text + csv).encode()).hexdigest()[:16]
    folder = cache_dir() / "benchmarks" / f"drift-base-{key}" if cache else Path(tempfile.mkdtemp(prefix="keel-drift-"))
    base = folder / "base"
    if (base / "model" / "manifest.json").is_file():
        print(f"base run: cached in {base}", flush=True)
        return base, 0.0
    shutil.rmtree(base, ignore_errors=True)  # an interrupted one
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "old.csv").write_text(csv)
    (folder / "drift.yaml").write_text(text.replace("{data}", str(folder / "old.csv")))
    t0 = time.perf_counter()
    train_run(load_recipe(folder / "drift.yaml", [f"output.dir={base}"]))
    return base, time.perf_counter() - t0


def majority(frame) -> float:
    return float(frame["label"].value_counts(normalize=True).iloc[0]) if len(frame) else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topic", default="google")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-round", type=int, default=150)
    ap.add_argument("--train", type=int, default=1600, help="training rows of the base run")
    ap.add_argument("--new-test", type=int, default=300, help="topic tweets kept aside to score the new slice")
    ap.add_argument("--no-cache", action="store_true", help="train the base run again")
    ap.add_argument("--run", help="a run directory: write the curves to RUN/learn/simulation.json, rebuild its report")
    args = ap.parse_args()
    if args.run and not (Path(args.run) / "recipe.yaml").is_file():
        raise SystemExit(
            f"--run {args.run}: not a keel run directory (no recipe.yaml); pass the folder `keel run` printed"
        )

    import torch

    from keel.data.builtin import DATASETS
    from keel.data.splits import load_frozen
    from keel.learn.loop import learn, score
    from keel.rundir import current_version

    torch.set_num_threads(1)  # on a busy machine 2 threads ran a step 5-15x slower than 1
    spec = DATASETS["tweets-sentiment"]
    df = spec.read(spec.paths()).rename(columns={"sentiment": "label"})[["text", "label"]].dropna()
    df = df.drop_duplicates("text").sample(frac=1.0, random_state=0).reset_index(drop=True)
    on_topic = df["text"].str.lower().str.contains(args.topic, regex=False)
    old, new = df[~on_topic], df[on_topic].reset_index(drop=True)
    need = args.rounds * args.per_round + args.new_test
    if len(new) < need:
        raise SystemExit(
            f"only {len(new)} tweets mention {args.topic!r}; need {need} (--rounds x --per-round + --new-test)"
        )
    new_test, feed = new[: args.new_test], new[args.new_test : need]
    t0 = time.perf_counter()
    base, base_s = base_run(old, args.train, not args.no_cache)
    frozen = load_frozen(base)
    old_test = frozen.test
    base_validation = score(base, frozen.validation)["accuracy"]
    print(f"base run: {base_validation:.3f} validation accuracy ({base_s:.0f} s)", flush=True)
    work = Path(tempfile.mkdtemp(prefix="keel-drift-arms-"))
    arms: dict[str, list] = {}
    try:
        for arm, replay in (("replay", 1.0), ("no-replay", 0.0)):
            run = work / arm
            shutil.copytree(base, run, ignore=shutil.ignore_patterns("checkpoints", ".keel.lock"))
            overrides = [f"learn.replay={replay}"]
            rounds = [scored(run, 0, None, old_test, new_test)]
            for r in range(1, args.rounds + 1):
                chunk = feed[(r - 1) * args.per_round : r * args.per_round]
                post_feedback(run, chunk, current_version(run), r)
                decision = learn(run, overrides)
                rounds.append(scored(run, r, decision, old_test, new_test))
                print(
                    f"{arm:10s} round {r}: {rounds[-1]['old_test_accuracy']:.3f} old test, "
                    f"{rounds[-1]['new_slice_accuracy']:.3f} new slice ({decision['action']})",
                    flush=True,
                )
            arms[arm] = rounds
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.no_cache:
            shutil.rmtree(base.parent, ignore_errors=True)
    device = "gpu" if torch.cuda.is_available() else "cpu"
    result = {
        "benchmark": "drift",
        "topic": args.topic,
        "rounds": args.rounds,
        "per_round": args.per_round,
        "base_train_rows": args.train,
        "base_validation_accuracy": round(base_validation, 4),
        "new_slice_test_rows": len(new_test),
        "old_test_rows": len(old_test),
        "majority_class_accuracy": {
            "old_test": round(majority(old_test), 4),
            "new_slice": round(majority(new_test), 4),
        },
        "model": MODEL,
        "arms": arms,
        "base_seconds": round(base_s, 1),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"drift-{device}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"drift-{device}.svg").write_text(svg(result))
    print(f"\n{'arm':10s} {'round':>5s} {'old test':>9s} {'new slice':>9s}")
    for arm, rounds in arms.items():
        for row in rounds:
            print(f"{arm:10s} {row['round']:5d} {row['old_test_accuracy']:9.3f} {row['new_slice_accuracy']:9.3f}")
    print(f"majority class: {result['majority_class_accuracy']}; wall {result['wall_seconds']} s; -> {out}")
    if args.run:
        from keel.io import atomic_write_json
        from keel.report import write_report
        from keel.report.learn import SIMULATION
        from keel.rundir import learn_dir

        run = Path(args.run)
        learn_dir(run).mkdir(exist_ok=True)
        atomic_write_json(learn_dir(run) / SIMULATION, result)
        print(f"report: {write_report(run)}")


def svg(result: dict) -> str:
    """Accuracy per round: solid = new slice, dashed = old test split; one colour per arm (the report's plot)."""
    from keel.report.learn import simulation_plot

    return simulation_plot(result) + "\n"


if __name__ == "__main__":
    main()
