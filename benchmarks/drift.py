"""Simulated drift on the tweets: a topic the deployed model never saw comes back as feedback.

The tweets that mention one word (``--topic``, default google: 87% neutral, against 39% in the rest) are held back
from training. A small MiniLM run is trained on the rest; then the held-back tweets arrive as label feedback (their
gold labels, written to the run's feedback database as `POST /v1/feedback` would) in ``--rounds`` rounds of
``--per-round`` texts, each followed by one `keel learn` round (keel.learn.loop.learn). Two arms start from copies
of the same run: with replay (learn.replay=1: as many rows of the training split as feedback rows) and without
(learn.replay=0). The promotion gate is opened in both (learn.margin=-1, learn.max_old_drop=1) so that every
challenger serves and the arms show what replay does; the decision the default gate (margin 0.01, max_old_drop
0.01) would have made is recorded beside each round.

After each round the served version is scored on the old test split (the run's frozen test split, no topic
tweets) and on a fixed test set of the new topic (held-back tweets never fed back).

    .venv/bin/python benchmarks/drift.py                       # not yet run to the end on an idle machine
    .venv/bin/python benchmarks/drift.py --rounds 2 --per-round 80

On a 2-core machine shared by many processes (load ~20) a MiniLM step took ~40 s, so a round took ~6 minutes; at
--train 320 for one epoch the base run had learned nothing (a constant prediction), which makes the figure
meaningless: give it an idle machine or a GPU.

Writes benchmarks/results/drift-<device>.json and drift-<device>.svg (accuracy per round, both arms, both sets).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

RECIPE = """
name: drift
task: classification
model: {{name: minilm-l6, max_length: 48}}
data:
  path: {data}
  split: {{validation: 0.1, test: 0.15, seed: 0}}
  max_train_samples: {train}
  max_eval_samples: 300
train: {{epochs: 2, batch_size: 16, lr: 1.0e-4, num_threads: 2, seed: 0}}
serve: {{feedback: {{store_text: true}}}}
learn: {{epochs: 2, lr: 1.0e-4, margin: -1.0, max_old_drop: 1.0, min_feedback: 8, holdout: 0.25}}
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
        figures = json.loads(json.dumps(decision["figures"]))
        row["default_gate"] = "promote" if decide(figures, 0.01, 0.01)[0] else "refuse"
        row["decision_figures"] = decision["figures"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topic", default="google")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-round", type=int, default=100)
    ap.add_argument("--train", type=int, default=800, help="training rows of the base run")
    ap.add_argument("--new-test", type=int, default=300, help="topic tweets kept aside to score the new slice")
    args = ap.parse_args()

    import torch

    from keel.data.builtin import DATASETS
    from keel.data.splits import load_frozen
    from keel.learn.loop import learn
    from keel.pipeline import train_run
    from keel.recipe import load_recipe
    from keel.rundir import current_version

    torch.set_num_threads(2)
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
    work = Path(tempfile.mkdtemp(prefix="keel-drift-"))
    t0 = time.perf_counter()
    try:
        old.head(args.train * 2).to_csv(work / "old.csv", index=False)  # more than the cap: the splits take their share
        (work / "drift.yaml").write_text(RECIPE.format(data=work / "old.csv", train=args.train))
        base = train_run(load_recipe(work / "drift.yaml", [f"output.dir={work / 'base'}"]))
        old_test = load_frozen(base).test
        arms: dict[str, list] = {}
        for arm, replay in (("replay", 1.0), ("no-replay", 0.0)):
            run = work / arm
            shutil.copytree(base, run)
            overrides = [f"learn.replay={replay}"]
            rounds = []

            rounds.append(scored(run, 0, None, old_test, new_test))
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
    device = "gpu" if torch.cuda.is_available() else "cpu"
    result = {
        "benchmark": "drift",
        "topic": args.topic,
        "rounds": args.rounds,
        "per_round": args.per_round,
        "base_train_rows": args.train,
        "new_slice_test_rows": args.new_test,
        "old_test_rows": len(old_test),
        "model": "minilm-l6",
        "arms": arms,
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
    print(f"-> {out}")


def svg(result: dict) -> str:
    """Accuracy per round: solid = new slice, dashed = old test split; one colour per arm."""
    w, h, pad = 520, 300, 48
    rounds = result["rounds"]
    colors = {"replay": "#1f77b4", "no-replay": "#d62728"}

    def x(r):
        return pad + (w - 2 * pad) * r / max(1, rounds)

    def y(a):
        return h - pad - (h - 2 * pad) * a

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
        f'<text x="{w / 2}" y="16" text-anchor="middle">accuracy after each feedback round ({result["topic"]} tweets)</text>',
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#333"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#333"/>',
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<text x="{pad - 6}" y="{y(tick) + 4}" text-anchor="end">{tick:.2f}</text>')
    for r in range(rounds + 1):
        parts.append(f'<text x="{x(r)}" y="{h - pad + 16}" text-anchor="middle">{r}</text>')
    for i, (arm, rows) in enumerate(result["arms"].items()):
        for key, dash, label in (("new_slice_accuracy", "", "new slice"), ("old_test_accuracy", "5,4", "old test")):
            pts = " ".join(f"{x(row['round']):.1f},{y(row[key]):.1f}" for row in rows)
            parts.append(
                f'<polyline points="{pts}" fill="none" stroke="{colors.get(arm, "#555")}" stroke-width="2"'
                + (f' stroke-dasharray="{dash}"' if dash else "")
                + "/>"
            )
            ly = pad + 14 * (2 * i + (dash != ""))
            parts.append(
                f'<text x="{w - pad - 4}" y="{ly}" text-anchor="end" fill="{colors.get(arm, "#555")}">{arm}: {label}</text>'
            )
    parts.append(f'<text x="{w / 2}" y="{h - 8}" text-anchor="middle">feedback round</text></svg>')
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    main()
