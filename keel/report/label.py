"""Report sections of the data stage's enrichment and labelling: augmentation counts (RUN/data/augment.json), the
labelling functions and label model against majority vote (RUN/data/weak.json), and the active-learning curves
(RUN/labels/*.rounds.jsonl from `keel label`, RUN/labels/simulation.json from benchmarks/active_learning.py)."""

from __future__ import annotations

import html
import json
from pathlib import Path

from keel.report.parts import fmt, png, read_json


def _table(head: list[str], rows: list[list]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _pct(v) -> str:
    return "not measured" if v is None else f"{100 * v:.1f}%"


def section_augment(run_dir: Path, ctx: dict) -> str | None:
    doc = read_json(run_dir / "data" / "augment.json")
    if not doc:
        return None
    rows = [[html.escape(op), f"{n:,}"] for op, n in doc["per_op"].items()]
    out = [
        "<h2>Augmentation</h2>",
        f"<p>{doc['added']:,} augmented copies added to the {doc['train_before']:,} training texts "
        "(training split only; validation and test are as given).</p>",
        _table(["operation", "copies"], rows),
    ]
    if doc.get("examples"):
        ex = [[html.escape(e["op"]), html.escape(e["source"]), html.escape(e["copy"])] for e in doc["examples"]]
        out.append(_table(["operation", "original", "copy"], ex))
    return "".join(out)


def section_weak(run_dir: Path, ctx: dict) -> str | None:
    doc = read_json(run_dir / "data" / "weak.json")
    if not doc:
        return None
    gold = any("accuracy" in f for f in doc["functions"])
    head = ["function", "coverage", "overlaps", "conflicts", *(["accuracy (gold)", "gold votes"] if gold else [])]
    rows = [
        [html.escape(f["name"]), _pct(f["coverage"]), _pct(f["overlaps"]), _pct(f["conflicts"])]
        + ([_pct(f.get("accuracy")), f"{f.get('gold_votes', 0):,}"] if gold else [])
        for f in doc["functions"]
    ]
    out = [
        "<h2>Weak supervision</h2>",
        f"<p>{len(doc['functions'])} labelling functions from {html.escape(Path(doc['functions_file']).name)} on "
        f"{doc['texts']:,} texts ({html.escape(doc.get('source', ''))}); the model trained on the "
        f"{html.escape(doc['trained_on'])}'s labels of the {doc['kept']:,} texts at least one function voted on. "
        f"Label model: {html.escape(doc['label_model'])}"
        + (f"; chosen: {html.escape(doc['chosen_by'])}" if doc.get("chosen_by") else "")
        + ".</p>",
        _table(head, rows),
    ]
    for key, what in (("versus_gold", "the gold labels"), ("on_validation", "the validation split's labels")):
        vs = doc.get(key)
        if vs:
            out.append(
                _table(
                    ["combined by", f"accuracy on {what}", "coverage"],
                    [[html.escape(k), fmt(v["accuracy"]), _pct(v["coverage"])] for k, v in vs.items()],
                )
            )
    return "".join(out)


def _rounds(run_dir: Path) -> dict[str, list[dict]]:
    """Session curves: store name -> [{labels, validation_accuracy}] of its latest session."""
    curves = {}
    for path in sorted((run_dir / "labels").glob("*.rounds.jsonl")):
        entries = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        if entries:
            last = max(e.get("session", 0) for e in entries)
            curves[path.name.removesuffix(".rounds.jsonl")] = [e for e in entries if e.get("session", 0) == last]
    return curves


def section_label(run_dir: Path, ctx: dict) -> str | None:
    sim = read_json(run_dir / "labels" / "simulation.json")
    sessions = _rounds(run_dir) if (run_dir / "labels").is_dir() else {}
    if not sim and not sessions:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = ["<h2>Active learning</h2>"]
    if sessions:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        for name, entries in sessions.items():
            xs = [e["labels"] for e in entries if e.get("validation_accuracy") is not None]
            ys = [e["validation_accuracy"] for e in entries if e.get("validation_accuracy") is not None]
            ax.plot(xs, ys, "o-", label=f"{name} ({entries[-1]['strategy']})")
        ax.set_xlabel("labels given")
        ax.set_ylabel("validation accuracy (probe)")
        ax.legend(fontsize=8)
        total = sum(entries[-1]["labels"] for entries in sessions.values())
        out.append(
            f"<p>`keel label` sessions: {total:,} labels stored; after each round a linear probe on the run's frozen "
            "embeddings is refitted on the training split plus the labels, and scored on the validation split.</p>"
        )
        out.append(png(fig))
    if sim:
        fig, ax = plt.subplots(figsize=(9, 4))
        colours = plt.get_cmap("tab20").colors
        chosen = sim.get("chosen_on_validation")
        for n, (strategy, curve) in enumerate(sim["curves"].items()):
            xs, ys = [p["labels"] for p in curve], [p["accuracy"] for p in curve]
            if strategy == "random":
                ax.plot(xs, ys, "k--", lw=1.5, label=strategy)
                ax.axhline(ys[-1], color="k", lw=0.6, ls=":")  # the accuracy to reach
            else:
                style = {"color": "crimson", "lw": 2.6, "ms": 4, "zorder": 5} if strategy == chosen else {}
                style = {"color": colours[n % len(colours)], "lw": 1.0, "ms": 2} | style
                ax.plot(
                    xs, ys, "o-", label=strategy + (" (chosen on validation)" if strategy == chosen else ""), **style
                )
        ax.set_xlabel("labels")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"simulated oracle on {sim.get('data', 'the pool')} (mean of {sim.get('seeds', 1)} seeds)")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        out.append(
            f"<p>Simulated oracle ({html.escape(str(sim.get('setup', '')))}): accuracy against the number of labels "
            "for each strategy and for random sampling.</p>"
        )
        out.append(png(fig))
        if sim.get("chosen_on_validation"):
            out.append(
                f"<p>Every choice was made on a validation split; chosen there: "
                f"<b>{html.escape(str(sim['chosen_on_validation']))}</b> (probe C {html.escape(str(sim.get('probe_c')))}"
                "). The curves and the first column are on the test set.</p>"
            )
        if sim.get("labels_to_match_random"):
            on_val = sim.get("labels_to_match_random_validation") or {}

            def _n(n):
                return "not reached" if n is None else f"{n:,}"

            rows = [
                [html.escape(s), _n(n)] + ([_n(on_val.get(s))] if on_val else [])
                for s, n in sim["labels_to_match_random"].items()
            ]
            head = ["strategy", "labels to reach random's final accuracy"] + (["on validation"] if on_val else [])
            out.append(_table(head, rows))
    return "".join(out)
