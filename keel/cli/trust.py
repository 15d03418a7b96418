"""Trust verbs: token explanations and fairness audits (keel/trust)."""

from __future__ import annotations

import json
import sys

import typer

from keel.cli._app import app
from keel.errors import KeelError
from keel.progress import esc, out


@app.command()
def explain(
    run_dir: str = typer.Argument(..., help="a run directory"),
    texts: list[str] = typer.Argument(..., help="texts to explain; a single - reads one text per line from stdin"),
    steps: int = typer.Option(32, help="integrated-gradients steps"),
    as_json: bool = typer.Option(False, "--json", help="print JSON lines"),
) -> None:
    """Token attributions (integrated gradients): which words pushed the prediction, coloured in the terminal."""
    from keel.runtime.load import load_trained
    from keel.trust.explain import explain_trained, render_terminal

    if texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
        if not texts:
            raise KeelError("explain: no text on stdin; pipe one text per line, or pass texts as arguments")
    if steps < 2:  # before the model is loaded
        raise KeelError(f"--steps must be at least 2; got {steps}")
    for e in explain_trained(load_trained(run_dir), texts, n_steps=steps):
        if as_json:
            print(json.dumps({k: v for k, v in e.to_json().items() if k != "rollout"}))
        else:
            out.print(
                f"[bold]{esc(e.label)}[/] ({e.score:.3f})  ",
                render_terminal(e),
                f"  [dim]completeness delta {e.delta:+.1e}[/]",
            )
    if not as_json:
        out.print("[dim]green: toward the predicted label, red: against it[/]")


@app.command()
def audit(run_dir: str = typer.Argument(..., help="a run directory")) -> None:
    """Explanations and a fairness audit of a run (the recipe's audit section, or defaults); exit 3 if a gate fails."""
    from pathlib import Path

    from keel.report import write_report
    from keel.trust.audit import run_audit

    if not Path(run_dir).is_dir():
        raise KeelError(f"run directory '{run_dir}' not found; pass the folder `keel run` printed (see runs/)")
    try:
        run_audit(run_dir)
    finally:
        if (Path(run_dir) / "audit").is_dir():
            out.print(
                f"wrote {esc(Path(run_dir) / 'audit')}/, {esc(Path(run_dir) / 'model' / 'MODEL_CARD.md')} and "
                f"{esc(write_report(run_dir))}"
            )
