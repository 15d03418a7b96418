"""The console's figures as inline SVG: matplotlib through keel/report/parts.py's ``svg`` (text kept as escaped text,
no math parsing of names), under one lock (pyplot is not thread-safe, and pages render in a thread pool)."""

from __future__ import annotations

import threading

from keel.report.parts import SVG_RC, svg
from keel.ui.compare import fairness_gaps, front, pareto_points

LOCK = threading.Lock()
MAX_POINTS = 2000  # training steps drawn in a curve


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_ticks(ax) -> None:
    """Log-axis ticks as plain numbers (matplotlib's default ones are math text, which SVG_RC turns off)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def pareto_svg(runs: list[dict]) -> str | None:
    """Accuracy against throughput and against size, every run's variants in its colour, each run's front dashed."""
    import matplotlib

    measured = [(r["name"], pareto_points(r)) for r in runs]
    measured = [(name, pts) for name, pts in measured if pts]
    if not measured:
        return None
    with LOCK, matplotlib.rc_context(SVG_RC):
        plt = _plt()
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for i, (name, pts) in enumerate(measured):
            color = f"C{i % 10}"
            for ax, key, higher in ((axes[0], "throughput", True), (axes[1], "mb", False)):
                ax.scatter([p[key] for p in pts], [p["accuracy"] for p in pts], color=color, alpha=0.7, label=name)
                best = front([(p[key], p["accuracy"]) for p in pts], higher)
                ax.plot([x for x, _ in best], [y for _, y in best], color=color, ls="--", lw=1)
                for p in pts:  # the front's variants are named; the others are in the run's report
                    if (p[key], p["accuracy"]) in best:
                        ax.annotate(
                            p["variant"], (p[key], p["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
                        )
        axes[0].set_xlabel("samples/s at batch 32 (log scale; right is better)")
        axes[1].set_xlabel("size on disk, MB (log scale; left is better)")
        for ax in axes:
            ax.set_xscale("log")
            _plain_ticks(ax)
            ax.set_ylabel("accuracy (bench split)")
            ax.margins(x=0.15, y=0.2)
        axes[0].legend(fontsize=8, loc="lower left")
        fig.suptitle("compression: every variant measured, and each run's Pareto front (dashed)", fontsize=10)
        return svg(fig, "Pareto fronts: accuracy against throughput and size")


def fairness_svg(runs: list[dict]) -> str | None:
    """One panel per audited attribute: each group's selection-rate gap, a bar per run (hatched: too small to rank)."""
    import matplotlib

    gaps = [(r["name"], fairness_gaps(r)) for r in runs]
    attrs = sorted({a for _, g in gaps for a, v in g.items() if v["groups"]})
    if not attrs:
        return None
    with LOCK, matplotlib.rc_context(SVG_RC):
        plt = _plt()
        cols = min(3, len(attrs))
        rows = -(-len(attrs) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
        for ax in axes.flat[len(attrs) :]:
            ax.axis("off")
        width = 0.8 / len(gaps)
        for k, (ax, attr) in enumerate(zip(axes.flat, attrs)):
            groups = sorted({g["group"] for _, run_gaps in gaps for g in (run_gaps.get(attr) or {}).get("groups", [])})
            for i, (_, run_gaps) in enumerate(gaps):
                by_group = {g["group"]: g for g in (run_gaps.get(attr) or {}).get("groups", [])}
                for j, group in enumerate(groups):
                    g = by_group.get(group)
                    if g is None or g["gap"] is None:
                        continue
                    ax.bar(
                        j - 0.4 + width * (i + 0.5),
                        g["gap"],
                        width=width,
                        color=f"C{i % 10}",
                        alpha=1.0 if g["ranked"] else 0.4,
                        hatch=None if g["ranked"] else "//",
                    )
            ax.axhline(0, color="black", lw=0.8)
            ax.set_xticks(range(len(groups)), groups, rotation=25, ha="right", fontsize=8)
            ax.set_title(attr, fontsize=10)
            if k % cols == 0:
                ax.set_ylabel("selection rate\nminus overall")
        from matplotlib.patches import Patch

        fig.legend(handles=[Patch(color=f"C{i % 10}", label=name) for i, (name, _) in enumerate(gaps)], fontsize=8)
        fig.tight_layout()
        return svg(fig, "fairness: selection-rate gap per group, per run")


def curves_svg(records: list[dict]) -> str | None:
    """The report's training curves (keel/report: loss per step, validation metrics), as SVG."""
    import matplotlib

    from keel.report import curves_figure

    steps = [r for r in records if "split" not in r]
    if len(steps) > MAX_POINTS:  # every k-th step: an SVG of 100,000 points is megabytes (the report's PNG is not)
        keep = {id(r) for r in steps[:: -(-len(steps) // MAX_POINTS)]}
        records = [r for r in records if "split" in r or id(r) in keep]
    with LOCK, matplotlib.rc_context(SVG_RC):
        fig = curves_figure(records)
        return None if fig is None else svg(fig, "training curves")


def labels_svg(sessions: list[dict]) -> str | None:
    """Probe validation accuracy against labels given, one line per `keel label` store."""
    import matplotlib

    curves = [(s["name"], [r for r in s["rounds"] if r.get("validation_accuracy") is not None]) for s in sessions]
    curves = [(name, rounds) for name, rounds in curves if rounds]
    if not curves:
        return None
    with LOCK, matplotlib.rc_context(SVG_RC):
        plt = _plt()
        fig, ax = plt.subplots(figsize=(7, 3.2))
        for name, rounds in curves:
            ax.plot([r.get("labels") for r in rounds], [r["validation_accuracy"] for r in rounds], "o-", label=name)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("labels given")
        ax.set_ylabel("validation accuracy (probe)")
        ax.legend(fontsize=8)
        return svg(fig, "probe accuracy per round")
