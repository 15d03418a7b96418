"""Several runs side by side, as plain data: headline metrics, fairness gaps per group, the variants each run measured
(for its Pareto fronts), privacy spent, and the recipe diff. keel/ui/plots.py draws them."""

from __future__ import annotations

import difflib
import math

HIDDEN_GROUPS = ("none", "several")  # texts naming no group, or several: in the overall rate, not plotted


def _get(d: dict | None, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def metrics_rows(runs: list[dict]) -> list[tuple[str, list]]:
    """(figure, one value per run) for every figure at least one run recorded, in reading order."""
    figures = [
        ("task", lambda r: r["task"]),
        ("model", lambda r: r["model"]),
        ("status", lambda r: r["status"]),
        ("started", lambda r: r["started"] or None),
        ("test accuracy", lambda r: _get(r, "test", "accuracy")),
        ("test macro-F1", lambda r: _get(r, "test", "macro_f1")),
        ("majority-class accuracy", lambda r: _get(r, "test", "baseline", "accuracy")),
        ("test loss", lambda r: _get(r, "test", "loss")),
        ("test perplexity", lambda r: _get(r, "test", "perplexity")),
        ("test examples", lambda r: _get(r, "test", "n")),
        ("selection metric", lambda r: _get(r, "train", "selection_metric")),
        ("best validation metric", lambda r: _get(r, "train", "best_metric")),
        ("optimiser steps", lambda r: _get(r, "train", "steps")),
        ("training samples/s", lambda r: _get(r, "train", "samples_per_second")),
        ("peak memory MB", lambda r: _get(r, "train", "peak_rss_mb")),
        ("wall time s", lambda r: r.get("wall_seconds")),
        ("deployable variant", lambda r: r.get("deployable")),
        ("deployable test accuracy", lambda r: _get(r, "pick", "test", "accuracy")),
        ("deployable x lower p50 latency", lambda r: _get(r, "pick", "figures", "speedup_p50_vs_pipeline")),
        ("deployable x smaller", lambda r: _get(r, "pick", "figures", "smaller_vs_pipeline")),
        ("epsilon spent", lambda r: epsilon(r.get("privacy"))),
    ]
    rows = [(name, [get(r) for r in runs]) for name, get in figures]
    return [(name, values) for name, values in rows if any(v is not None for v in values)]


def epsilon(p: dict | None):
    return None if not p else p.get("epsilon", p.get("epsilon_spent"))


def privacy_rows(runs: list[dict]) -> list[dict]:
    """Privacy spent per run: epsilon, delta, noise, sampling rate, steps (None where the run trained without DP)."""
    out = []
    for r in runs:
        p = r.get("privacy")
        out.append(
            {
                "run": r["name"],
                "dp": bool(p),
                "epsilon": epsilon(p),
                "target_epsilon": None if not p else p.get("target_epsilon", p.get("epsilon_budget")),
                "delta": None if not p else p.get("delta"),
                "noise_multiplier": None if not p else p.get("noise_multiplier"),
                "sample_rate": None if not p else p.get("sample_rate"),
                "steps": None if not p else p.get("steps", p.get("rounds_with_noise")),
                "accountant": None if not p else p.get("accountant", p.get("mode")),
            }
        )
    return out


def fairness_gaps(run: dict) -> dict:
    """{attribute: {"dp": demographic parity diff., "eo": equalized odds diff., "groups": [{group, n, gap, ranked}]}}
    where a group's gap is its selection rate minus the rate over every audited text (all groups, weighted by n)."""
    attrs = _get(run, "fairness", "attributes") or {}
    out = {}
    for attr, r in attrs.items():
        groups = r.get("groups") or []
        total = sum(g.get("n") or 0 for g in groups)
        overall = sum((g.get("n") or 0) * (g.get("selection_rate") or 0) for g in groups) / total if total else None
        shown = [
            {
                "group": str(g.get("group")),
                "n": g.get("n"),
                "gap": None if overall is None or g.get("selection_rate") is None else g["selection_rate"] - overall,
                "ranked": bool(g.get("ranked")),
            }
            for g in groups
            if g.get("group") not in HIDDEN_GROUPS
        ]
        out[attr] = {
            "dp": r.get("demographic_parity_difference"),
            "eo": r.get("equalized_odds_difference"),
            "groups": shown,
        }
    return out


def front(points: list[tuple[float, float]], higher_x: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both x and accuracy (higher x better, or lower), in x order."""
    better = (lambda a, b: a >= b) if higher_x else (lambda a, b: a <= b)
    front = [p for p in points if not any(better(q[0], p[0]) and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


def pareto_points(run: dict) -> list[dict]:
    """The run's measured variants (bench.json): variant, accuracy, samples/s at batch 32, MB on disk."""
    rows = _get(run, "bench", "variants") or []
    keep = []
    for v in rows:
        acc, thr, mb = v.get("accuracy"), v.get("throughput_batch32"), v.get("disk_mb")
        if all(isinstance(x, int | float) and math.isfinite(x) for x in (acc, thr, mb)) and thr > 0 and mb > 0:
            keep.append({"variant": str(v.get("variant")), "accuracy": acc, "throughput": thr, "mb": mb})
    return keep


def recipe_diff(a: dict, b: dict) -> list[str]:
    """The unified diff of two runs' recipe.yaml (lines, unescaped)."""
    return list(
        difflib.unified_diff(
            a["recipe_text"].splitlines(),
            b["recipe_text"].splitlines(),
            fromfile=f"{a['name']}/recipe.yaml",
            tofile=f"{b['name']}/recipe.yaml",
            lineterm="",
        )
    )
