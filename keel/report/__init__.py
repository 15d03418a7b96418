"""report.html: one self-contained page (inline CSS, plots as embedded PNG or inline SVG) built from a run directory.

The report reads only files in the run directory, so it can be rebuilt at any time
(`keel report RUN_DIR`). Each section is a function ``(run_dir, ctx) -> html | None``, listed in SECTIONS in
page order; sections of later stages live next to their stage (keel/report/trust.py, generative.py,
keel/report/federated.py) and share the helpers of keel/report/parts.py.
"""

from __future__ import annotations

import html
import json
import logging
import math
from pathlib import Path

from keel.compress.budget import versus_teacher
from keel.io import atomic_write_text, writes_run
from keel.metrics import read_metrics
from keel.report import trust as _trust  # data, fairness, explanations, privacy, environment
from keel.report.data import section_curation  # data.curate: counts per step, duplicates, PII, label issues
from keel.report.federated import section_federated  # federated runs: rounds and privacy
from keel.report.generative import section_align, section_samples, section_sft
from keel.report.label import section_augment, section_label, section_weak  # data enrichment and labelling
from keel.report.parts import fmt as _fmt
from keel.report.parts import num as _num
from keel.report.parts import png as _png
from keel.report.parts import read_json as _json
from keel.rundir import deployable_file

logger = logging.getLogger(__name__)

CSS = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#1d2330}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.2em;border-bottom:1px solid #dde;padding-bottom:.2em;margin-top:1.8em}
.sub{color:#667} table{border-collapse:collapse;margin:.6em 0} td,th{padding:.3em .8em;border-bottom:1px solid #eef;text-align:left}
th{background:#f5f6fa} .num{text-align:right;font-variant-numeric:tabular-nums} img,svg.plot{max-width:100%;height:auto}
.good{color:#137333;font-weight:600} .bad{color:#b3261e;font-weight:600}
pre{background:#f5f6fa;padding:.8em;overflow:auto;font-size:13px}
tr.pick td{background:#e6f4ea;font-weight:600} p.pick{background:#e6f4ea;padding:.5em .8em} p.fail{background:#fce8e6;padding:.5em .8em}
.tok{padding:0 1px;border-radius:2px}
"""


_DIGITS = {
    "disk_mb": 1,
    "p50_ms_batch1": 2,
    "p95_ms_batch1": 2,
    "throughput_batch32": 1,
    "peak_rss_mb": 0,
    "speedup_p50_vs_pipeline": 2,
    "throughput_vs_pipeline": 2,
    "throughput_sorted_vs_pipeline": 2,
    "smaller_vs_pipeline": 2,
}


def _cell(key: str, v) -> str:
    """A bench table cell: scores to 4 places, sizes, times and ratios to the places that mean something."""
    return f"{v:.{_DIGITS[key]}f}" if isinstance(v, float) and key in _DIGITS else _fmt(v)


def section_summary(run_dir: Path, ctx: dict) -> str:
    info, train = ctx["run"], ctx["run"].get("train") or {}
    counts = (train.get("data") or {}).get("counts") or {}
    federated = bool(train.get("federated"))
    wall = _num(info.get("wall_seconds"), 1, " s") or (
        f"training {_num(info.get('train_wall_seconds'), 1, ' s')}"
        if info.get("train_wall_seconds") is not None
        else None
    )
    rows = [
        ("recipe sha256", (info.get("recipe_sha256") or "")[:16] or None),
        ("task", info.get("task")),
        ("model", ctx["recipe"].get("model", {}).get("name")),
        ("data", (train.get("data") or {}).get("source")),
        (
            "examples (train / validation / test)",
            " / ".join(f"{counts[k]:,}" for k in ("train", "validation", "test"))
            if all(k in counts for k in ("train", "validation", "test"))
            else None,
        ),
        ("rounds" if federated else "optimiser steps", train.get("steps")),
        (None if federated else "epochs", train.get("epochs_done")),
        (None if federated else "best step", train.get("best_step")),
        ("training throughput", _num(train.get("samples_per_second"), 1, " samples/s")),
        ("peak memory (RSS)", _num(train.get("peak_rss_mb"), 0, " MB")),
        ("wall time", wall),
    ]
    # a figure the run did not record is left out, not printed as None or ?
    return (
        "<h2>Run</h2><table>"
        + "".join(f"<tr><th>{k}</th><td>{_fmt(v)}</td></tr>" for k, v in rows if k and v is not None)
        + "</table>"
    )


def section_test(run_dir: Path, ctx: dict) -> str | None:
    test = _json(run_dir / "eval" / "test.json")
    if not test:
        return None
    out = ["<h2>Test set</h2>"]
    if "accuracy" in test:
        base = test.get("baseline", {})
        out.append("<table><tr><th></th><th>accuracy</th><th>macro-F1</th></tr>")
        out.append(
            f"<tr><td>model</td><td class='num'>{test['accuracy']:.4f}</td><td class='num'>{test['macro_f1']:.4f}</td></tr>"
        )
        if base:
            out.append(
                f"<tr><td>majority class ({html.escape(base['label'])})</td><td class='num'>{base['accuracy']:.4f}</td>"
                f"<td class='num'>{base['macro_f1']:.4f}</td></tr>"
            )
        out.append("</table>")
        if base:
            gain = test["accuracy"] - base["accuracy"]
            cls = "good" if gain > 0 else "bad"
            out.append(
                f"<p class='{cls}'>{gain * 100:+.1f} accuracy points over the majority-class baseline "
                f"on {test['n']} test examples.</p>"
            )
        out.append(_confusion_plot(test))
    else:
        if test.get("reply_tokens"):  # `keel eval` of chats or pairs: the loss is the replies'
            on = (
                f" on {test['reply_tokens']:,} reply tokens of {test['n']:,} test examples (every token: loss "
                f"{test['loss_all_tokens']:.4f})"
            )
        else:
            on = (
                f" on {test['tokens']:,} tokens"
                if test.get("tokens")
                else f" on the replies of {test['n']:,} test examples"
                if test.get("n")
                else ""
            )
        ppl = test.get("perplexity")
        measured = isinstance(ppl, float) and not math.isnan(ppl)
        ppl = f", perplexity {ppl:.2f}" if measured and ppl < 100 else f", perplexity {ppl:,.0f}" if measured else ""
        out.append(f"<p>loss {test['loss']:.4f}{ppl}{on}.</p>")
    return "".join(out)


def _confusion_plot(test: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cm, labels = np.asarray(test["confusion"]), test["labels"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(labels), 1.0 + 0.8 * len(labels)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(
                j, i, int(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black"
            )
    ax.set_title("confusion matrix (test)")
    return _png(fig)


def section_curves(run_dir: Path, ctx: dict) -> str | None:
    fig = curves_figure(ctx["metrics"])
    return None if fig is None else "<h2>Training curves</h2>" + _png(fig)


def curves_figure(records: list[dict]):
    """Loss per step (and its running mean) beside the validation metrics, from metrics.jsonl; None without steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    steps = [r for r in records if "split" not in r and "loss" in r]
    evals = [r for r in records if r.get("split") == "validation"]
    if not steps:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1, alpha=0.5, label="train (per step)")
    if len(steps) >= 10:
        import numpy as np

        k = max(2, len(steps) // 20)
        smooth = np.convolve([r["loss"] for r in steps], np.ones(k) / k, mode="valid")
        axes[0].plot([r["step"] for r in steps][k - 1 :], smooth, lw=2, label=f"train (mean of {k})")
    if evals:
        axes[0].plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="validation")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[0].set_title("loss")
    keys = [k for k in ("accuracy", "macro_f1", "perplexity") if evals and k in evals[0]]
    for k in keys:  # by step, like the loss: an epoch axis says nothing when there is one epoch
        axes[1].plot([r["step"] for r in evals], [r[k] for r in evals], "o-", label=k)
    axes[1].set_xlabel("step")
    axes[1].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[1].set_title("validation" if keys else "validation: no metric recorded")
    if keys:
        axes[1].legend()
    return fig


def section_recipe(run_dir: Path, ctx: dict) -> str:
    text = (run_dir / "recipe.yaml").read_text() if (run_dir / "recipe.yaml").exists() else ""
    return f"<h2>Recipe</h2><pre>{html.escape(text)}</pre>"


def _pareto(rows: list[dict]) -> list[dict]:
    """Variants no other variant beats on both latency and accuracy, fastest first."""
    front = [
        r
        for r in rows
        if not any(
            o["p50_ms_batch1"] <= r["p50_ms_batch1"]
            and o["accuracy"] >= r["accuracy"]
            and (o["p50_ms_batch1"], o["accuracy"]) != (r["p50_ms_batch1"], r["accuracy"])
            for o in rows
        )
    ]
    return sorted(front, key=lambda r: r["p50_ms_batch1"])


def _stages_html(run_dir: Path) -> str:
    """What each compression stage did, from the stages' own keel.json."""
    items = []
    for stage in ("student", "pruned"):
        info = _json(run_dir / "compress" / stage / "model" / "keel.json")
        if not info:
            continue
        if stage == "student":
            d = info.get("distill", {})
            kept = info.get("teacher_layers_kept")
            what = (f"teacher layers {kept} kept" if kept else f"student {d.get('student')}") + (
                f"; loss {d.get('alpha')} x CE + {1 - d.get('alpha', 0):g} x T\u00b2 KL at T = {d.get('temperature')}"
                + (f" + {d.get('hidden_weight')} x hidden-state MSE" if d.get("hidden_weight") else "")
            )
        else:
            parts = [f"from the {info.get('pruned_from')}"]
            st = info.get("structured") or {}
            if st.get("heads_per_layer"):
                parts.append(f"heads kept per layer {st['heads_per_layer']}")
            if st.get("ffn_per_layer"):
                parts.append(f"FFN neurons kept per layer {st['ffn_per_layer']}")
            if info.get("vocab"):
                parts.append(
                    f"embeddings keep {info['vocab']['tokens_kept']:,} of {info['vocab']['tokens_before']:,} tokens"
                )
            if info.get("unstructured"):
                parts.append(f"{info['unstructured']['sparsity']:.1%} of block weights zero")
            parts.append(f"parameters {info['params_before']:,} -> {info['params_after']:,}")
            what = "; ".join(parts)
        items.append(f"<li><b>{stage}</b>: {html.escape(what)}</li>")
    return f"<ul>{''.join(items)}</ul>" if items else ""


def section_bench(run_dir: Path, ctx: dict) -> str | None:
    """`keel bench`/`keel compress`: the variants side by side, the Pareto front of accuracy against latency
    (marker area = size on disk), and the deployable pick within the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bench = _json(run_dir / "bench.json")
    if not bench:
        return None
    rows = bench["variants"]
    pick = _json(deployable_file(run_dir)) or {}
    chosen = pick.get("deployable")
    split = bench.get("split", "test")  # benches written before the validation pick scored the test split
    head = (
        "variant",
        f"{split} accuracy",
        "macro-F1",
        "MB",
        "p50 ms (b=1)",
        "p95 ms (b=1)",
        "samples/s (b=32)",
        "peak RSS MB",
        "x faster",
        "x throughput",
        "x throughput, length-sorted",
        "x smaller",
    )
    keys = (
        "variant",
        "accuracy",
        "macro_f1",
        "disk_mb",
        "p50_ms_batch1",
        "p95_ms_batch1",
        "throughput_batch32",
        "peak_rss_mb",
        "speedup_p50_vs_pipeline",
        "throughput_vs_pipeline",
        "throughput_sorted_vs_pipeline",
        "smaller_vs_pipeline",
    )
    table = (
        "<table><tr>"
        + "".join(f"<th>{h}</th>" for h in head)
        + "</tr>"
        + "".join(
            ("<tr class='pick'>" if r["variant"] == chosen else "<tr>")
            + "".join(f"<td class='num'>{_cell(k, r.get(k, '-'))}</td>" for k in keys)
            + "</tr>"
            for r in rows
        )
        + "</table>"
    )
    fig, ax = plt.subplots(figsize=(7, 4.2))
    biggest = max(r["disk_mb"] for r in rows) or 1
    for i, r in enumerate(rows):
        ax.scatter(
            r["p50_ms_batch1"],
            r["accuracy"],
            s=60 + 900 * r["disk_mb"] / biggest,
            alpha=0.55,
            edgecolors="black" if r["variant"] == chosen else "none",
            linewidths=2,
        )
        ax.annotate(
            r["variant"] + (" (deployable)" if r["variant"] == chosen else ""),
            (r["p50_ms_batch1"], r["accuracy"]),
            textcoords="offset points",
            xytext=(8, 10 if i % 2 else -14),
            fontsize=8,
        )
    front = _pareto(rows)
    ax.step(
        [r["p50_ms_batch1"] for r in front],
        [r["accuracy"] for r in front],
        where="post",
        color="grey",
        linestyle="--",
        linewidth=1,
        label="Pareto front",
    )
    budget = pick.get("budget") or {}
    base = rows[0]["accuracy"]
    if "max_accuracy_drop" in budget:
        ax.axhline(
            base - budget["max_accuracy_drop"] / 100,
            color="red",
            linewidth=0.8,
            linestyle=":",
            label=f"accuracy budget (-{budget['max_accuracy_drop']:g} points)",
        )
    ax.set_xscale("log")
    ax.margins(x=0.2, y=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("p50 latency at batch 1 (ms, log scale)")
    ax.set_ylabel(f"{split} accuracy")
    ax.set_title("accuracy vs latency: the Pareto front (marker area = size on disk)")
    if chosen:
        r = next(x for x in rows if x["variant"] == chosen)
        score = pick.get("test") or r  # picked on validation, scored once on the test split
        side = versus_teacher(score["accuracy_drop_points"], places=2)
        picked_n = f"{r['n']:,} " if r.get("n") else "the "
        scored_n = f"{score['n']:,} " if score.get("n") else "the "
        how = (
            f"picked on {picked_n}{split} examples (accuracy {_fmt(r['accuracy'])}, "
            f"{versus_teacher(r['accuracy_drop_points'], places=2)}), then scored once on the test split: "
            if "test" in pick
            else ""
        )
        verdict = (
            f"<p class='pick'>Deployable model: <b>{html.escape(chosen)}</b>: {how}accuracy {_fmt(score['accuracy'])} "
            f"on {scored_n}test examples ({side}), {r['speedup_p50_vs_pipeline']:.1f}x lower p50 latency, "
            f"{r['throughput_vs_pipeline']:.1f}x throughput, {r['smaller_vs_pipeline']:.1f}x smaller. "
            f"Use it with <code>--backend {html.escape(chosen)}</code>.</p>"
        )
    elif pick:
        verdict = (
            "<p class='fail'>No variant is within the budget: " + html.escape(json.dumps(pick.get("budget"))) + "</p>"
        )
    else:
        verdict = ""
    return (
        f"<h2>Compression: variants and the Pareto front</h2>{verdict}{_stages_html(run_dir)}"
        f"<p>Ratios against the fp32 teacher run through transformers' <code>pipeline</code>, measured in the same "
        f"session, each variant in its own process, every one scoring the same batches of 32 (in the split's "
        f"order; and, for the length-sorted column, the same batches of similar-length texts)"
        + (
            f", each ratio the median of {bench['rounds']} rounds' ratios, each against that round's pipeline"
            if bench.get("rounds", 1) > 1
            else ""
        )
        + f".</p>{table}{_png(fig)}"
    )


SECTIONS = [
    section_summary,
    _trust.section_data,
    section_curation,
    section_augment,
    section_weak,
    section_test,
    section_curves,
    section_samples,
    section_sft,
    section_align,
    section_bench,
    _trust.section_fairness,
    _trust.section_explain,
    _trust.section_privacy,
    _trust.section_environment,
    section_federated,
    section_label,
    section_recipe,
]

from keel.secure.sbom import section_provenance  # noqa: E402  (SBOM and the hashes of what went in)

SECTIONS.insert(SECTIONS.index(section_recipe), section_provenance)
from keel.report.learn import section_learn  # noqa: E402  (keel learn's decisions)

SECTIONS.insert(SECTIONS.index(section_provenance), section_learn)


def _build(section, run_dir: Path, ctx: dict) -> str | None:
    """One section's HTML; a section that fails says so in its place (and the traceback goes to the log)."""
    try:
        return section(run_dir, ctx)
    except Exception as e:
        name = section.__name__.removeprefix("section_").replace("_", " ")
        logger.exception("report: the %s section of %s could not be built", name, run_dir)
        why = f"{type(e).__name__}: {e}"
        return (
            f"<h2>{html.escape(name.capitalize())}</h2><p class='fail'>This section could not be built: "
            f"{html.escape(why[:500])}. Fix the cause, then rebuild the page with <code>keel report</code>.</p>"
        )


@writes_run
def write_report(run_dir: str | Path) -> Path:
    import yaml

    run_dir = Path(run_dir)
    recipe_path = run_dir / "recipe.yaml"
    ctx = {
        "run": _json(run_dir / "run.json") or {},
        "metrics": read_metrics(run_dir),
        "recipe": yaml.safe_load(recipe_path.read_text()) if recipe_path.exists() else {},
    }
    body = [s for s in (_build(section, run_dir, ctx) for section in SECTIONS) if s]
    title = html.escape(ctx["run"].get("name", run_dir.name))
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>keel report: {title}</title>"
        f"<style>{CSS}</style></head><body><h1>keel report: {title}</h1>"
        f"<p class='sub'>{html.escape(str(run_dir))}</p>{''.join(body)}</body></html>"
    )
    out = run_dir / "report.html"
    atomic_write_text(out, page)
    return out
