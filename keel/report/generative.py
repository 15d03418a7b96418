"""Report sections for generative runs: sample generations, alignment before/after, TRL training curves."""

from __future__ import annotations

import html
import json
from pathlib import Path

from keel.report.parts import png


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def section_samples(run_dir: Path, ctx: dict) -> str | None:
    data = _json(run_dir / "eval" / "samples.json")
    if not data or not data.get("samples"):
        return None
    rows = "".join(
        f"<tr><td><pre>{html.escape(s['prompt'])}</pre></td><td><pre>{html.escape(s['completion'])}</pre></td></tr>"
        for s in data["samples"]
    )
    return (
        f"<h2>Sample generations</h2><p class='sub'>openings from the test split, continued by the final model "
        f"(temperature {data.get('temperature')}, top-k {data.get('top_k')}, seeded)</p>"
        f"<table><tr><th>prompt</th><th>continuation</th></tr>{rows}</table>"
    )


def _fmt(v, digits=3):
    return "-" if v is None else f"{v:.{digits}f}"


def section_align(run_dir: Path, ctx: dict) -> str | None:
    r = _json(run_dir / "eval" / "align.json")
    if not r:
        return None
    b, a = r["before"], r["after"]
    rows = [
        (
            "held-out preference agreement (policy prefers chosen)",
            _fmt(b["preference_agreement"]),
            _fmt(a["preference_agreement"]),
            "higher is better",
        )
    ]
    if "crows_pairs" in b:
        rows.append(
            (
                "CrowS-Pairs stereotype score (%)",
                _fmt(b["crows_pairs"]["stereotype_score"], 1),
                _fmt(a["crows_pairs"]["stereotype_score"], 1),
                f"50 is ideal; {r['closer_to_50_points']:+.1f} points closer",
            )
        )
    if "shakespeare_perplexity" in b:
        rows.append(
            (
                "held-out Shakespeare perplexity",
                _fmt(b["shakespeare_perplexity"], 2),
                _fmt(a["shakespeare_perplexity"], 2),
                f"alignment tax {r['alignment_tax_pct']:+.1f}%",
            )
        )
    w = r["win_rate"]
    rows.append(("reward-model win rate vs the reference", "0.500", _fmt(w["win_rate"]), f"{w['n']} held-out prompts"))
    rows.append(
        ("reward model held-out pairwise accuracy", "", _fmt(r["reward_model_accuracy"]), "the judge's own accuracy")
    )
    table = (
        "<table><tr><th>held-out figure</th><th>reference</th><th>aligned</th><th></th></tr>"
        + "".join(
            f"<tr><td>{k}</td><td class='num'>{x}</td><td class='num'>{y}</td><td>{n}</td></tr>" for k, x, y, n in rows
        )
        + "</table>"
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, before, after = ["preference agreement"], [b["preference_agreement"]], [a["preference_agreement"]]
    if "crows_pairs" in b:
        names.append("stereotype score / 100")
        before.append(b["crows_pairs"]["stereotype_score"] / 100)
        after.append(a["crows_pairs"]["stereotype_score"] / 100)
    names.append("win rate")
    before.append(0.5)
    after.append(w["win_rate"])
    fig, ax = plt.subplots(figsize=(6.5, 2.8))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], before, 0.4, label="reference")
    ax.bar([i + 0.2 for i in x], after, 0.4, label=f"aligned ({r['method']})")
    ax.axhline(0.5, color="#999", lw=0.8, ls="--")
    ax.set_xticks(list(x), names)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    samples = "".join(
        f"<tr><td>{html.escape(s['prompt'])}</td><td>{html.escape(s['reference'])}</td>"
        f"<td>{html.escape(s['aligned'])}</td></tr>"
        for s in r.get("samples", [])
    )
    return (
        f"<h2>Alignment ({html.escape(r['method'])}, beta {r['beta']}): before vs after, held-out pairs only</h2>"
        f"<p class='sub'>{r['train_pairs']} training pairs, {r['held_out_pairs']} held-out pairs, split by pair</p>"
        f"{table}{png(fig)}{_curves(run_dir)}"
        f"<h3>Greedy continuations of held-out prompts</h3><table><tr><th>prompt</th><th>reference</th>"
        f"<th>aligned</th></tr>{samples}</table>"
    )


def _curves(run_dir: Path) -> str:
    path = run_dir / "train_logs.jsonl"
    if not path.is_file():
        return ""
    import matplotlib.pyplot as plt

    stages: dict[str, list] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            stages.setdefault(r["stage"], []).append((r["step"], r["loss"]))
    if not stages:
        return ""
    fig, axes = plt.subplots(1, len(stages), figsize=(3.3 * len(stages), 2.6), squeeze=False)
    for ax, (name, pts) in zip(axes[0], stages.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_title(f"{name} training loss", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    return png(fig)


def section_sft(run_dir: Path, ctx: dict) -> str | None:
    if "sft" not in (ctx.get("recipe") or {}) or not ctx["recipe"].get("sft"):
        return None
    test = _json(run_dir / "eval" / "test.json") or {}
    line = ""
    if "loss_before" in test:
        line = (
            f"<p>test loss on response tokens: {test['loss_before']:.4f} before, <b>{test['loss']:.4f}</b> after "
            f"(perplexity {test['perplexity_before']:.2f} -> {test['perplexity']:.2f}, n={test['n']})</p>"
        )
    return f"<h2>Supervised fine-tuning ({html.escape(ctx['recipe']['sft']['method'])})</h2>{line}{_curves(run_dir)}"
