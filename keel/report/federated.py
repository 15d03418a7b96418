"""The report section of a federated run: global accuracy per round, skipped rounds, rejected sites, privacy."""

from __future__ import annotations

import html
from pathlib import Path

from keel.report.parts import png


def section_federated(run_dir: Path, ctx: dict) -> str | None:
    rounds = [r for r in ctx["metrics"] if "round" in r]
    train = ctx["run"].get("train", {})
    if not rounds or not train.get("federated"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4))
    xs = [r["round"] for r in rounds]
    for key in ("accuracy", "macro_f1"):
        if key in rounds[0]:
            ax.plot(xs, [r.get(key) for r in rounds], "o-", label=f"global model, validation {key}")
    skipped = [r["round"] for r in rounds if r.get("skipped")]
    for x in skipped:
        ax.axvline(x, color="#b3261e", alpha=0.3, lw=6)
    ax.set_xlabel("round (0 = initial model)")
    ax.set_title("federated training" + (" (red: skipped rounds)" if skipped else ""))
    ax.legend()
    if any("epsilon" in r for r in rounds):
        ax2 = ax.twinx()
        ax2.plot(xs, [r.get("epsilon", 0.0) for r in rounds], "s--", color="#7a5", label="epsilon spent")
        ax2.set_ylabel("epsilon spent")
        ax2.legend(loc="lower right")
    per_round = train.get("seconds_per_round")
    rows = [
        ("sites", train.get("sites")),
        ("strategy", train.get("strategy")),
        (
            "rounds done / planned",
            f"{train.get('rounds_done')} / {train.get('rounds_planned')}"
            if train.get("rounds_done") is not None and train.get("rounds_planned") is not None
            else None,
        ),
        ("rounds skipped", train.get("rounds_skipped")),
        ("secure aggregation (SecAgg+)", None if train.get("secagg") is None else "on" if train["secagg"] else "off"),
        ("time per round", None if per_round is None else f"{per_round:,.1f} s"),
    ]
    p = train.get("privacy")
    if p:
        rows += [
            ("differential privacy", p["mode"]),
            ("epsilon spent", f"{p['epsilon_spent']:.3f}"),
            (
                "epsilon budget",
                "none (a noise multiplier was set instead)" if p.get("epsilon_budget") is None else p["epsilon_budget"],
            ),
            ("delta", f"{p['delta']:.2g}"),
            ("clipping norm", p["clipping_norm"]),
        ]
        rows += [
            ("noise multiplier", f"{p['noise_multiplier']:.3f}"),
            ("rounds with noise", p["rounds_with_noise"]),
            ("accountant", f"{p.get('accountant', 'rdp').upper()} (Opacus), each site's whole data is the unit"),
        ]
        if p["mode"] == "central":
            rows += [
                ("noise std on the mean", f"{p['noise_std']:.4g} (z * C / m)"),
                (
                    "sites per round (m)",
                    f"{p['sites_per_round']}, each sampled with probability {p['sample_rate']:.3g}",
                ),
            ]
        else:
            rows += [("noise std per site", f"{p['noise_std']:.4g} (z * sensitivity {p['sensitivity']:g})")]
    rejected = [(r["round"], s) for r in rounds for s in r.get("rejected", [])]
    table = (
        "<table>"
        + "".join(f"<tr><th>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows if v is not None)
        + "</table>"
    )
    notes = ""
    if rejected:
        notes = (
            "<p class='bad'>rejected updates: "
            + ", ".join(f"round {r}: {html.escape(s)}" for r, s in rejected)
            + "</p>"
        )
    return f"<h2>Federated rounds</h2>{table}{notes}{png(fig)}"
