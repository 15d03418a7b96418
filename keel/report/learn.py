"""The report section of a run that `keel learn` has judged: every decision (promoted, refused, skipped, rolled
back) with its figures, a plot of both models' accuracy per round, and the version served now; and the curves of a
simulated drift (RUN/learn/simulation.json, written by benchmarks/drift.py --run)."""

from __future__ import annotations

import html
from pathlib import Path

from keel.report.parts import fmt, read_json, svg_lines
from keel.rundir import decisions_dir, learn_dir, learn_state

SIMULATION = "simulation.json"  # in RUN/learn/: benchmarks/drift.py --run writes it, as active_learning.py does
NEW, OLD = "#1f77b4", "#d62728"


def _accuracy(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def rounds_plot(decisions: list[dict]) -> str | None:
    """Champion and challenger accuracy on the new data and on the old, one point per judged round."""
    judged = [d for d in decisions if isinstance(d.get("figures"), dict) and isinstance(d.get("round"), int)]
    if not judged:
        return None
    series = []
    for key, name, color in (("new", "new data", NEW), ("old", "old data", OLD)):
        for who, dash in (("challenger", False), ("champion", True)):
            points = []
            for d in judged:
                acc = _accuracy((d["figures"].get(key) or {}).get(who))
                model = d.get("challenger") if who == "challenger" else d.get("champion")
                points.append((d["round"], acc, f"round {d['round']}: {model} ({d.get('action')}) {fmt(acc)}"))
            series.append({"label": f"{name}: {who}", "points": points, "color": color, "dash": dash})
    return svg_lines(series, "accuracy per learning round", "round", "accuracy")


def simulation_plot(sim: dict) -> str:
    """The benchmark's arms: served model's accuracy on the new slice (solid) and the old test split (dashed)."""
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    series = []
    for i, (arm, rows) in enumerate((sim.get("arms") or {}).items()):
        for key, name, dash in (("new_slice_accuracy", "new slice", False), ("old_test_accuracy", "old test", True)):
            points = [
                (r["round"], _accuracy(r.get(key)), f"{arm} round {r['round']}: {r.get('version')}")
                for r in rows
                if isinstance(r.get("round"), int)
            ]
            series.append({"label": f"{arm}: {name}", "points": points, "color": colors[i % 4], "dash": dash})
    return svg_lines(series, f"simulated drift: {sim.get('topic')} tweets fed back", "feedback round", "accuracy")


def _simulation(run_dir: Path) -> str:
    sim = read_json(learn_dir(run_dir) / SIMULATION)
    if not sim or not isinstance(sim.get("arms"), dict):
        return ""
    n_new, n_old = sim.get("new_slice_test_rows"), sim.get("old_test_rows")
    new = f"{n_new:,} topic tweets never fed back (the new slice)" if n_new else "the new slice"
    old = f"the old test split ({n_old:,} rows)" if n_old else "the old test split"
    text = (
        f"Tweets that mention {sim.get('topic')!r} were held back from training, then fed back as label feedback in "
        f"{sim.get('rounds')} rounds of {sim.get('per_round')} texts, each followed by one `keel learn` round; two "
        f"arms from copies of the same base run ({sim.get('model')}), with and without replay. Accuracy of the "
        f"served version on {new} and on {old}."
    )
    majority = sim.get("majority_class_accuracy") or {}
    if majority.get("new_slice") is not None and majority.get("old_test") is not None:
        text += (
            f" Always answering the majority class would score {majority['new_slice']:.3f} on the new slice and "
            f"{majority['old_test']:.3f} on the old test split."
        )
    return f"<h3>Simulated drift (benchmarks/drift.py)</h3><p>{html.escape(text)}</p>{simulation_plot(sim)}"


def section_learn(run_dir: Path, ctx: dict) -> str | None:
    folder = decisions_dir(run_dir)
    files = sorted(folder.glob("[0-9]*.json")) if folder.is_dir() else []
    decisions = [d for d in (read_json(p) for p in files) if d]
    simulation = _simulation(run_dir)
    if not decisions:
        return f"<h2>Learning from feedback</h2>{simulation}" if simulation else None
    rows = []
    for d in decisions:
        figures = d.get("figures") or {}
        new, old = figures.get("new") or {}, figures.get("old") or {}
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{cell}</td>"
                for cell in (
                    d.get("round"),
                    html.escape(str(d.get("action"))),
                    html.escape(f"{d.get('champion')} → {d.get('challenger') or d.get('now_serving') or '–'}"),
                    fmt(new.get("champion")) if new else "–",
                    fmt(new.get("challenger")) if new else "–",
                    fmt(old.get("champion")) if old else "–",
                    fmt(old.get("challenger")) if old else "–",
                    html.escape(str(d.get("why", ""))),
                )
            )
            + "</tr>"
        )
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "round",
            "decision",
            "champion → challenger",
            "new data: champion",
            "challenger",
            "old data: champion",
            "challenger",
            "why",
        )
    )
    current = html.escape(learn_state(run_dir)["current"])
    return (
        f"<h2>Learning from feedback</h2><p>Serving version <b>{current}</b>. New data: the held-out part of the "
        "label feedback; old data: the run's frozen validation split (accuracy).</p>"
        f"<table><tr>{head}</tr>{''.join(rows)}</table>" + (rounds_plot(decisions) or "") + simulation
    )
