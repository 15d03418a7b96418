"""A learn round's bookkeeping, shared by the classifier and the causal-LM rounds: round numbers, decision files
(RUN/learn/decisions/NNNN.json, written before learn/state.json changes), the promotion or refusal that ends a
round, and pruning of old versions."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from keel import rundir
from keel.io import atomic_write_json


def next_round(run_dir: Path) -> int:
    folder = rundir.decisions_dir(run_dir)
    done = [int(p.stem) for p in folder.glob("*.json") if p.stem.isdigit()] if folder.is_dir() else []
    return max(done, default=0) + 1


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_decision(run_dir: Path, decision: dict) -> Path:
    path = rundir.decisions_dir(run_dir) / f"{decision['round']:04d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, decision)
    return path


def conclude(run_dir: Path, decision: dict, promote: bool, state: dict, final: Path, last_id: int, keep: int) -> dict:
    """Write the decision, then (promoted) the state a polling server swaps to, or (refused) delete the
    challenger's weights (its figures are in the decision)."""
    decision["file"] = str(write_decision(run_dir, decision))  # the decision first, then the state it leads to
    if promote:
        version = final.name
        state.update(
            current=version, history=[*state["history"], version], learned_through=last_id, round=decision["round"]
        )
        atomic_write_json(rundir.learn_state_file(run_dir), state)
        prune(run_dir, state, keep)
    else:
        shutil.rmtree(final, ignore_errors=True)
    return decision


def prune(run_dir: Path, state: dict, keep: int) -> None:
    """Delete learned versions outside the last ``keep`` of the promoted history (never the one served)."""
    wanted = set(state["history"][-keep:]) | {state["current"]}
    folder = rundir.learn_dir(run_dir)
    for d in folder.glob("v[0-9][0-9][0-9][0-9]"):
        if d.is_dir() and d.name not in wanted:
            shutil.rmtree(d, ignore_errors=True)
