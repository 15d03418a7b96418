"""Report sections for data, fairness, explanations, privacy and environment (keel.trust writes their inputs)."""

from __future__ import annotations

import html
import json
import platform
from pathlib import Path

from keel.report.parts import fmt, png, read_json


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _table(head: list[str], rows: list[list]) -> str:
    f = fmt
    return (
        "<table><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in head)
        + "</tr>"
        + "".join("<tr>" + "".join(f"<td class='num'>{f(v)}</td>" for v in r) + "</tr>" for r in rows)
        + "</table>"
    )


def data_summary(run_dir: Path) -> dict | None:
    """Sizes, class balance and token lengths per split; computed once from the tokenized cache, then kept."""
    path = run_dir / "data_summary.json"
    doc = read_json(path)
    if doc or not (run_dir / "model").is_dir():
        return doc
    import numpy as np
    from transformers import AutoTokenizer

    from keel.data.prepare import prepare_data
    from keel.io import atomic_write_json
    from keel.recipe import load_recipe

    # the splits frozen in the run directory; a failure here is shown in the report as this section's (write_report)
    recipe = load_recipe(run_dir / "recipe.yaml")
    if (
        recipe.sft or recipe.align
    ):  # chats and preference pairs are not tokenized splits; the run table has their counts
        return None
    data = prepare_data(recipe, AutoTokenizer.from_pretrained(run_dir / "model"), run_dir)
    doc = {"source": data.meta.get("source"), "labels": data.labels, "splits": {}}
    for name, ds in data.splits.items():
        lengths = np.asarray([len(x) for x in ds["input_ids"]]) if len(ds) else np.zeros(0)
        entry = {
            "n": len(ds),
            "tokens_mean": float(lengths.mean()) if len(ds) else None,
            "tokens_p95": float(np.percentile(lengths, 95)) if len(ds) else None,
            "truncated": int((lengths >= recipe.model.max_length).sum()) if len(ds) else 0,
        }
        if "label" in ds.column_names and data.labels:
            counts = np.bincount(np.asarray(ds["label"], dtype=int), minlength=len(data.labels)) if len(ds) else []
            entry["classes"] = {data.labels[i]: int(c) for i, c in enumerate(counts)}
        doc["splits"][name] = entry
    atomic_write_json(path, doc)
    return doc


def section_data(run_dir: Path, ctx: dict) -> str | None:
    doc = data_summary(run_dir)
    if not doc:
        return None
    labels = doc["labels"] or []
    splits = doc["splits"]
    head = ["split", "examples", "mean tokens", "p95 tokens", "truncated", *labels]

    def tokens(v, places):
        return "no examples" if v is None else f"{v:,.{places}f}"

    rows = [
        [
            s,
            f"{e['n']:,}",
            tokens(e["tokens_mean"], 1),
            tokens(e["tokens_p95"], 0),
            f"{e['truncated']:,}",
            *[f"{(e.get('classes') or {}).get(lab, 0):,}" for lab in labels],
        ]
        for s, e in splits.items()
    ]
    what = "sizes, token lengths and class counts per split" if labels else "sizes and token lengths per split"
    return f"<h2>Data</h2><p>{html.escape(str(doc['source']))}: {what}:</p>{_table(head, rows)}"


def _diff(v) -> str:
    return "not measured" if v is None else f"{v:.4f}"


def section_fairness(run_dir: Path, ctx: dict) -> str | None:
    doc = read_json(run_dir / "audit" / "fairness.json")
    if not doc:
        return None
    out = [
        f"<h2>Fairness</h2><p>{doc['n']} {doc['split']} examples; groups from the {doc['source']}; positive outcome "
        f"'{html.escape(doc['positive_label'])}'. Groups with fewer than {doc['min_group_size']} examples are "
        f"flagged and left out of the differences.</p>"
    ]
    gates = read_json(run_dir / "audit" / "gates.json") or {}
    for fail in gates.get("failures", []):
        out.append(f"<p class='bad'>gate failed: {html.escape(fail)}</p>")
    for line in gates.get("unmeasurable", []):
        verdict = (
            "gate not evaluated (warn)" if gates.get("on_unmeasurable") == "warn" else "gate failed, nothing to measure"
        )
        out.append(f"<p class='bad'>{verdict}: {html.escape(line)}</p>")
    if gates.get("checked") and not gates.get("failures") and not gates.get("unmeasurable"):
        out.append(f"<p class='good'>all gates hold: {html.escape(json.dumps(gates['checked']))}</p>")
    base = doc.get("baseline")
    for attr, r in doc["attributes"].items():
        if r["demographic_parity_difference"] is None and r["equalized_odds_difference"] is None:
            line = (
                f"<h3>{html.escape(attr)}</h3><p>differences not measured: fewer than two groups have "
                f"{doc['min_group_size']} examples or more"
            )
        else:
            line = (
                f"<h3>{html.escape(attr)}</h3><p>demographic parity difference <b>{_diff(r['demographic_parity_difference'])}</b>, "
                f"equalized odds difference <b>{_diff(r['equalized_odds_difference'])}</b>"
            )
        if base and attr in base.get("attributes", {}):
            b = base["attributes"][attr]
            line += (
                f" (baseline run without mitigation: {_diff(b['demographic_parity_difference'])}, "
                f"{_diff(b['equalized_odds_difference'])})"
            )
        out.append(line + "</p>")
        out.append(
            _table(
                ["group", "n", "accuracy", "selection rate", "TPR", "FPR", "note"],
                [
                    [
                        g["group"],
                        g["n"],
                        g["accuracy"],
                        g["selection_rate"],
                        g["tpr"],
                        g["fpr"],
                        g["flag"] or ("" if g["ranked"] else "not ranked"),
                    ]
                    for g in r["groups"]
                ],
            )
        )
    # every named group is plotted; groups below min_group_size are pale and hatched (flagged, not ranked)
    shown = {a: [g for g in r["groups"] if g["group"] not in ("none", "several")] for a, r in doc["attributes"].items()}
    shown = {a: gs for a, gs in shown.items() if gs}
    if shown:
        plt = _plt()
        fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.2), squeeze=False)
        colors = {"selection_rate": "#1f77b4", "tpr": "#2ca02c", "fpr": "#d62728"}
        for ax, (attr, gs) in zip(axes[0], shown.items()):
            for i, g in enumerate(gs):
                for key, off in (("selection_rate", -0.27), ("tpr", 0.0), ("fpr", 0.27)):
                    ax.bar(
                        i + off,
                        g[key] or 0,
                        width=0.27,
                        color=colors[key],
                        alpha=1.0 if g["ranked"] else 0.35,
                        hatch=None if g["ranked"] else "//",
                        label=key if i == 0 else None,
                    )
            ax.set_xticks(
                range(len(gs)), [f"{g['group']}\n(n={g['n']})" for g in gs], rotation=20, ha="right", fontsize=8
            )
            ax.set_title(attr, fontsize=10)
            ax.set_ylim(0, 1)
        axes[0][0].legend(fontsize=7)
        out.append(png(fig) + "<p class='sub'>pale, hatched bars: groups too small to rank.</p>")
    subs = doc.get("subgroup_aucs") or []
    if subs:
        out.append(
            f"<h3>Subgroup AUCs (Borkan et al. 2019)</h3><p>overall AUC {fmt(doc.get('overall_auc'))}; "
            "BPSN: background positives vs subgroup negatives; BNSP: background negatives vs subgroup positives.</p>"
        )
        out.append(
            _table(
                ["subgroup", "n", "subgroup AUC", "BPSN AUC", "BNSP AUC", "note"],
                [
                    [s["subgroup"], s["n"], s["subgroup_auc"], s["bpsn_auc"], s["bnsp_auc"], s["flag"] or ""]
                    for s in sorted(subs, key=lambda s: -s["n"])
                ],
            )
        )
    cf = doc.get("counterfactual")
    if cf:
        out.append("<h3>Counterfactual identity-term swaps</h3>")
        out.append(
            _table(
                ["terms swapped", "texts", "prediction flip rate", "mean score change", "mean |score change|"],
                [
                    [c, v["n"], v["flip_rate"], v["mean_score_change"], v["mean_abs_score_change"]]
                    for c, v in cf.items()
                ],
            )
        )
        # the "all" entry repeats the examples of each category: each flipped text is shown once
        ex = list({(e["text"], e["counterfactual"]): e for v in cf.values() for e in v["examples"]}.values())[:5]
        if ex:
            out.append(
                "<p>Flipped examples:</p><ul>"
                + "".join(
                    f"<li>{html.escape(e['text'])} &rarr; <i>{html.escape(e['counterfactual'])}</i> "
                    f"(P {e['before']:.3f} &rarr; {e['after']:.3f})</li>"
                    for e in ex
                )
                + "</ul>"
            )
    mit = doc.get("mitigation")
    if mit:
        out.append("<h3>Mitigation: ThresholdOptimizer</h3>")
        if not mit.get("applied"):
            out.append(f"<p>not applied: {html.escape(mit.get('reason', ''))}</p>")
        else:
            b, a = mit["before"], mit["after"]
            out.append(
                f"<p>{html.escape(mit['constraint'])} on '{html.escape(mit['attribute'])}', {html.escape(mit['note'])}.</p>"
            )
            out.append(
                _table(
                    ["", "demographic parity diff.", "equalized odds diff.", "binary accuracy", "worst group accuracy"],
                    [
                        [
                            "before",
                            b["demographic_parity_difference"],
                            b["equalized_odds_difference"],
                            b["binary_accuracy"],
                            b["worst_group_accuracy"],
                        ],
                        [
                            "after",
                            a["demographic_parity_difference"],
                            a["equalized_odds_difference"],
                            a["binary_accuracy"],
                            a["worst_group_accuracy"],
                        ],
                    ],
                )
            )
        from keel.trust.mitigation import SOUND_BACKENDS, default_serve_backend, served_statement

        served = (mit.get("served") or {}).get("applied") and default_serve_backend(run_dir) in SOUND_BACKENDS
        out.append(f"<p class='{'good' if served else 'bad'}'>{html.escape(served_statement(run_dir, mit))}</p>")
    return "".join(out)


def section_explain(run_dir: Path, ctx: dict) -> str | None:
    doc = read_json(run_dir / "audit" / "explain.json")
    if not doc:
        return None
    from keel.trust.explain import Explanation, render_html

    c, fa = doc["completeness"], doc["faithfulness"]
    out = [
        f"<h2>Explanations</h2><p>{html.escape(doc['method'])}, {doc['n_steps']} steps, on {doc['n']} test texts. "
        f"Completeness: mean |delta| {c['mean_abs_delta']:.2e} (max {c['max_abs_delta']:.2e}; median relative "
        f"{c['median_relative_delta']:.2%}).</p>"
    ]
    if fa.get("n"):
        verdict = (
            "<span class='good'>more faithful than random tokens</span>"
            if fa["faithful"]
            else "<span class='bad'>not more faithful than random tokens</span>"
        )
        out.append(f"<p>ERASER faithfulness of the top-{fa['k']} tokens: {verdict}.</p>")
        out.append(
            _table(
                ["", "comprehensiveness (higher is better)", "sufficiency (lower is better)"],
                [
                    ["integrated gradients", fa["comprehensiveness"], fa["sufficiency"]],
                    [f"{fa['k']} random tokens", fa["comprehensiveness_random"], fa["sufficiency_random"]],
                ],
            )
        )
        plt = _plt()
        fig, ax = plt.subplots(figsize=(5.5, 2.8))
        for i, (_name, a, b) in enumerate(
            (
                ("comprehensiveness", fa["comprehensiveness"], fa["comprehensiveness_random"]),
                ("sufficiency", fa["sufficiency"], fa["sufficiency_random"]),
            )
        ):
            ax.bar([i - 0.18], [a], width=0.36, color="#2e7d32", label="top-k by attribution" if i == 0 else None)
            ax.bar([i + 0.18], [b], width=0.36, color="#9e9e9e", label="k random tokens" if i == 0 else None)
        ax.set_xticks([0, 1], ["comprehensiveness\n(higher is better)", "sufficiency\n(lower is better)"])
        ax.axhline(0, color="black", lw=0.6)
        ax.set_ylabel("drop in p(predicted class)")
        ax.legend(fontsize=8)
        out.append(png(fig))
    gi = doc.get("global_importance") or {}
    if gi:
        out.append("<h3>Global importance: tokens that push most toward each predicted class</h3>")
        out.append(
            _table(
                ["class", "tokens (total attribution, count)"],
                [
                    [label, ", ".join(f"{r['token']} ({r['total']:.2f}, {r['count']})" for r in rows)]
                    for label, rows in gi.items()
                ],
            )
        )
    if doc.get("examples"):
        out.append(
            "<h3>Heatmaps</h3><p>green: toward the predicted class, red: against it. "
            "Second line: attention rollout (relevance to [CLS]).</p><table>"
        )
        for e in doc["examples"]:
            x = Explanation(**e)
            roll = f"<br><small>{render_html(x, x.rollout)}</small>" if x.rollout else ""
            out.append(f"<tr><td>{html.escape(x.label)} ({x.score:.2f})</td><td>{render_html(x)}{roll}</td></tr>")
        out.append("</table>")
    return "".join(out)


def section_privacy(run_dir: Path, ctx: dict) -> str | None:
    p = (ctx["run"].get("train") or {}).get("privacy") or (read_json(run_dir / "train.json") or {}).get("privacy")
    if not p or "mode" in p:  # a federated run's client-level DP is in its own section (keel/report/federated.py)
        return None
    from keel.trust.card import privacy_lines

    rows = [
        ["epsilon spent", p["epsilon"]],
        ["target epsilon", p["target_epsilon"]],
        ["delta", p["delta"]],
        ["noise multiplier (sigma)", p["noise_multiplier"]],
        ["sampling rate q", p["sample_rate"]],
        ["steps", p["steps"]],
        ["planned steps", p["planned_steps"]],
        ["max grad norm", p["max_grad_norm"]],
        ["accountant", p["accountant"]],
        ["Poisson sampling", p["poisson_sampling"]],
    ]
    if p.get("unit") == "person":  # counterfactual copies: the guarantee is per person, each row clipped at C/k
        rows += [
            ["privacy unit", "person (a text and its counterfactual copy)"],
            ["persons (N)", p["persons"]],
            ["rows", p["rows"]],
            ["clip per row", p["row_clip"]],
        ]
    return (
        f"<h2>Privacy</h2><p>{html.escape(privacy_lines(p)[0])}</p>"
        + "<table>"
        + "".join(f"<tr><th>{k}</th><td class='num'>{fmt(v)}</td></tr>" for k, v in rows)
        + "</table>"
    )


def section_environment(run_dir: Path, ctx: dict) -> str:
    import os
    from importlib import metadata

    def v(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    rows = [
        (k, ctx["run"][key])
        for k, key in (("recipe sha256", "recipe_sha256"), ("keel (training)", "keel_version"))
        if ctx["run"].get(key)
    ]
    rows += [("python", platform.python_version()), ("platform", platform.platform()), ("CPU cores", os.cpu_count())]
    try:
        import torch

        rows.append(("accelerator", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"))
    except Exception:
        pass
    rows += [(p, v(p)) for p in ("torch", "transformers", "datasets", "accelerate", "captum", "fairlearn", "opacus")]
    return (
        "<h2>Environment</h2><p class='sub'>Library versions and hardware of the process that built this report.</p>"
        "<table>"
        + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(x))}</td></tr>" for k, x in rows)
        + "</table>"
    )
