"""`keel learn RUN_DIR`: one round of learning from the feedback a served run collected, or `--rollback`."""

from __future__ import annotations

import typer

from keel.cli._app import app
from keel.progress import esc, out


@app.command()
def learn(
    run_dir: str = typer.Argument(..., help="a served classification or causal-LM run directory"),
    overrides: list[str] | None = typer.Argument(None, help="learn.* (or train.*) overrides, e.g. learn.margin=0.02"),
    rollback: bool = typer.Option(False, "--rollback", help="serve the previously promoted version again"),
) -> None:
    """Fine-tune a challenger on new feedback (classifiers: labels plus replayed training rows; causal LMs: DPO on
    preferences, KTO on thumbs); promote it only when it beats the serving model by learn.margin on held-out
    feedback without losing more than learn.max_old_drop (learn.max_perplexity_rise) on the old data."""
    from pathlib import Path

    from keel.errors import KeelError

    if not Path(run_dir).is_dir():
        raise KeelError(f"run directory '{run_dir}' not found; pass the folder `keel run` printed (see runs/)")
    if rollback:
        if overrides:
            raise KeelError("--rollback takes no overrides; run `keel learn RUN_DIR --rollback`")
        from keel.learn.loop import rollback as _rollback

        decision = _rollback(run_dir)
    else:
        from keel.learn.loop import learn as _learn

        decision = _learn(run_dir, overrides)
    out.print(f"[bold]{decision['action']}[/]: {esc(decision['why'])}")
    for figures in (decision.get("figures") or {}).values():
        metric = figures.get("metric", "accuracy")
        out.print(
            f"  {esc(figures['set'])} ({figures['n']} examples), {esc(metric)}: champion "
            f"{_fmt(figures['champion'], metric)}, challenger {_fmt(figures['challenger'], metric)}"
        )
    out.print(f"[dim]decision: {esc(decision['file'])}[/]")


def _fmt(value, metric: str) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if metric.endswith("accuracy") else f"{value:.4g}"
