"""Run folders read into plain dicts for the console: what the runs list shows, and what a run page needs.

Only reads: nothing here writes into a run or takes its lock (a live writer is seen from the PID in its
``.keel.lock``). A file a stage has not written yet is simply absent from the dict; a name from a request is
resolved by ``run_path``, which never leaves the runs folder.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from keel.io import LOCK, read_json
from keel.metrics import read_metrics
from keel.rundir import deployable_file, learn_state

STATUS = {"finished": "done", "trained": "done", "failed": "failed", "gate failed": "failed"}


def run_path(root: Path, name: str) -> Path | None:
    """The run folder ``name`` in ``root``, or None: a single path segment (no ``..``, separators or absolute path)
    naming a folder with a run.json, that resolves inside ``root`` (a symlink out of it is refused too)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        return None
    base = Path(root).resolve()
    path = (base / name).resolve()
    if path.parent != base or not (path / "run.json").is_file():
        return None
    return path


def list_runs(root: Path) -> list[dict]:
    """Every run folder directly in ``root`` (one with a run.json), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [summary(p) for p in sorted(root.iterdir()) if run_path(root, p.name)]
    return sorted(found, key=lambda r: r["started"], reverse=True)


def writer(run_dir: Path) -> dict | None:
    """The process writing to the run now (from its lock file), else None. A holder on another machine (a shared
    file system) cannot be checked from here: it is taken at its word."""
    holder = read_json(run_dir / LOCK)
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return None
    if holder.get("host") not in (None, socket.gethostname()):
        return holder
    try:
        os.kill(pid, 0)
    except PermissionError:
        return holder
    except (OSError, OverflowError):
        return None
    return holder


def status(run_dir: Path, info: dict) -> tuple[str, str]:
    """(running | done | failed | stopped, a line saying more)."""
    raw = str(info.get("status", "unknown"))
    holder = writer(run_dir)
    if holder:
        return "running", f"{raw}: {holder.get('command', 'keel')} (PID {holder['pid']})"
    if raw == "running":  # run.json says running but no process holds the run: interrupted or killed
        return "stopped", "ended without finishing (interrupted?); continue it with keel run RECIPE --resume"
    word = STATUS.get(raw, raw)
    if word == "failed":
        return word, str(info.get("error") or raw)
    return word, "trained; no evaluation yet" if raw == "trained" else raw


def _recipe(run_dir: Path) -> tuple[str, dict]:
    import yaml

    try:
        text = (run_dir / "recipe.yaml").read_text(encoding="utf-8")
    except OSError:
        return "", {}
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        raw = None
    return text, raw if isinstance(raw, dict) else {}


def headline(test: dict, train: dict, fewshot: dict | None = None) -> list[tuple[str, float | str]]:
    """The figures a person looks at first: test accuracy and macro-F1, or perplexity; else, for a `keel fewshot`
    run, the old labels' test accuracy and the new labels (with their leave-one-out accuracy); else the best
    validation one."""
    out: list[tuple[str, float | str]] = []
    for key, name in (("accuracy", "test accuracy"), ("macro_f1", "test macro-F1"), ("perplexity", "test perplexity")):
        if isinstance(test.get(key), int | float):
            out.append((name, float(test[key])))
    if not out and isinstance(fewshot, dict):
        old = fewshot.get("old_test") if isinstance(fewshot.get("old_test"), dict) else {}
        if isinstance(old.get("accuracy_after"), int | float):
            out.append(("old-label test accuracy", float(old["accuracy_after"])))
        held = fewshot.get("new_held_out") if isinstance(fewshot.get("new_held_out"), dict) else {}
        new = [str(n) for n in fewshot.get("new_labels") or []]
        if new:
            out.append(
                (
                    "new labels (held-out accuracy)",
                    ", ".join(f"{n} ({held[n]:.2f})" if isinstance(held.get(n), int | float) else n for n in new),
                )
            )
    if not out and isinstance(train.get("best_metric"), int | float):
        out.append((f"best validation {train.get('selection_metric', 'metric')}", float(train["best_metric"])))
    return out


def privacy(info: dict, run_dir: Path) -> dict | None:
    """The DP-SGD (or federated client-level DP) figures the run recorded, or None when it trained without DP."""
    p = (info.get("train") or {}).get("privacy") or read_json(run_dir / "train.json").get("privacy")
    return p or None


def summary(run_dir: Path) -> dict:
    """One row of the runs list."""
    run_dir = Path(run_dir)
    info = read_json(run_dir / "run.json")
    _, recipe = _recipe(run_dir)
    test = read_json(run_dir / "eval" / "test.json")
    state, detail = status(run_dir, info)
    pick = read_json(deployable_file(run_dir)) or None
    model = recipe.get("model") if isinstance(recipe.get("model"), dict) else {}
    return {
        "name": run_dir.name,
        "recipe_name": info.get("name"),
        "task": info.get("task") or recipe.get("task"),
        "model": model.get("name"),
        "status": state,
        "status_detail": detail,
        "started": str(info.get("started", "")),
        "wall_seconds": info.get("wall_seconds"),
        "headline": headline(
            test, info.get("train") or {}, read_json(run_dir / "fewshot.json") if "fewshot_from" in info else None
        ),
        "deployable": (pick or {}).get("deployable"),
        "deployable_test": (pick or {}).get("test") or (pick or {}).get("figures"),
        "has_report": (run_dir / "report.html").is_file(),
        "has_labels": bool(label_stores(run_dir)),
    }


def label_stores(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / "labels"
    return sorted(p for p in folder.glob("*.jsonl") if not p.name.endswith(".rounds.jsonl")) if folder.is_dir() else []


def _jsonl(path: Path) -> list[dict]:
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:  # a line torn by an interrupted write (keel/label/session.py skips it too)
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def label_sessions(run_dir: Path, recent: int = 20) -> list[dict]:
    """`keel label` stores of the run: labels given (a later answer for a row wins), counts per label, the latest
    answers, and the probe's validation accuracy after each round of the latest session."""
    sessions = []
    for store in label_stores(run_dir):
        entries = [e for e in _jsonl(store) if "row" in e and "label" in e]
        by_row = {e["row"]: e for e in entries}
        counts: dict[str, int] = {}
        for e in by_row.values():
            counts[str(e["label"])] = counts.get(str(e["label"]), 0) + 1
        rounds = _jsonl(store.with_suffix(".rounds.jsonl"))
        last = max((r.get("session", 0) for r in rounds), default=0)
        sessions.append(
            {
                "name": store.name.removesuffix(".jsonl"),
                "labels": len(by_row),
                "counts": counts,
                "recent": [{"text": str(e.get("text", "")), "label": str(e["label"])} for e in entries[-recent:]][::-1],
                "rounds": [r for r in rounds if r.get("session", 0) == last],
            }
        )
    return sessions


def details(run_dir: Path) -> dict:
    """What a run page and a comparison show: the summary plus the recipe, curves, test figures, the bench and the
    deployable pick, the fairness audit, privacy spent, label sessions and `keel learn` state."""
    run_dir = Path(run_dir)
    info = read_json(run_dir / "run.json")
    text, recipe = _recipe(run_dir)
    learn = learn_state(run_dir) if (run_dir / "learn").is_dir() else None
    return {
        **summary(run_dir),
        "info": info,
        "recipe_text": text,
        "recipe": recipe,
        "metrics": read_metrics(run_dir),
        "test": read_json(run_dir / "eval" / "test.json"),
        "train": info.get("train") or read_json(run_dir / "train.json"),
        "bench": read_json(run_dir / "bench.json"),
        "pick": read_json(deployable_file(run_dir)) or None,
        "fairness": read_json(run_dir / "audit" / "fairness.json"),
        "gates": read_json(run_dir / "audit" / "gates.json"),
        "privacy": privacy(info, run_dir),
        "learn": learn,
    }
