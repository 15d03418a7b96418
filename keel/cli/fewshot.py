"""`keel fewshot`: labels added to a trained classifier from a few examples each, as a new run."""

from __future__ import annotations

import typer

from keel.cli._app import app
from keel.progress import esc, out


@app.command()
def fewshot(
    run_dir: str = typer.Argument(..., help="a finished classification run"),
    support: str = typer.Option(
        ..., "--support", help="labelled texts, a few per label (.csv, .tsv, .jsonl, .json or .parquet; text, label)"
    ),
    overrides: list[str] | None = typer.Argument(
        None, help="fewshot.* overrides, e.g. fewshot.method=setfit fewshot.k_shot=8 fewshot.meta.episodes=100"
    ),
) -> None:
    """Add labels to a classifier from a few examples each, keeping its old ones; writes RUN_DIR-fewshot, which
    predict, eval and serve load like any run."""
    from keel.fewshot.adapt import fewshot_run

    r = fewshot_run(run_dir, support, overrides)
    shots = ", ".join(f"{esc(name)} ({n})" for name, n in r["shots"].items())
    out.print(f"labels: {len(r['labels'])} ({len(r['new_labels'])} new); support rows per label: {shots}")
    val, old = r["old_validation"], r["old_test"]
    if val["rows"]:
        out.print(
            f"old labels, {val['rows']} validation rows: accuracy {val['accuracy_before']:.3f} before, "
            f"{val['accuracy_after']:.3f} after (allowed drop {val['max_old_drop']}; head rows {esc(r['old_rows'])})"
        )
    if old["rows"]:
        out.print(
            f"old labels, {old['rows']} test rows: accuracy {old['accuracy_before']:.3f} before, "
            f"{old['accuracy_after']:.3f} after ({r['method']} head)"
        )
    for name, acc in r["new_held_out"].items():
        n = r["shots"][name]
        held = "n/a (one row)" if acc is None else f"{acc:.3f} ({round(acc * n)}/{n})"
        out.print(f"new label {esc(name)}: accuracy on its support rows, each held out: {held}")
    out.print(
        f'new run: [bold]{esc(r["run_dir"])}[/]   next: keel predict {esc(r["run_dir"])} "..." or keel serve {esc(r["run_dir"])}'
    )
