"""The report section of a run that `keel learn` has judged: every decision (promoted, refused, skipped, rolled
back) with its figures, and the version served now."""

from __future__ import annotations

import html
from pathlib import Path

from keel.report.parts import fmt, read_json
from keel.rundir import decisions_dir, learn_state


def section_learn(run_dir: Path, ctx: dict) -> str | None:
    folder = decisions_dir(run_dir)
    files = sorted(folder.glob("[0-9]*.json")) if folder.is_dir() else []
    decisions = [d for d in (read_json(p) for p in files) if d]
    if not decisions:
        return None
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
        f"<table><tr>{head}</tr>{''.join(rows)}</table>"
    )
