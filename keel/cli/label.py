"""`keel label RUN_DIR --pool FILE`: active learning, in the terminal or a local web page (keel/label)."""

from __future__ import annotations

import typer

from keel.cli._app import app
from keel.errors import KeelError
from keel.progress import esc, out


@app.command()
def label(
    run_dir: str = typer.Argument(..., help="a classification run directory (its model embeds the pool)"),
    pool: str = typer.Option(..., "--pool", help="a .csv, .jsonl or .parquet file of texts to label"),
    strategy: str = typer.Option(
        "diverse",
        help="diverse (entropy + k-means spread; the default: chosen on benchmarks/active_learning.py's validation "
        "split), balanced (margin with an equal share of each batch per predicted label), margin, least-confidence, "
        "entropy, badge (k-means++ on gradient embeddings), typiclust (dense texts of clusters without labels), "
        "probcover (the text whose ball covers the most unlabelled ones), cluster-margin (small margins, one per "
        "cluster), density (margin times typicality) or random",
    ),
    batch_size: int = typer.Option(10, "--batch-size", help="texts per round; the probe is retrained after each"),
    rounds: int = typer.Option(5, help="rounds in this session"),
    web: bool = typer.Option(False, "--web", help="label in a browser: a page served on 127.0.0.1"),
    port: int = typer.Option(0, help="--web: the port (0: a free one)"),
    text_column: str = typer.Option(None, "--text-column", help="the pool's text column (default: the run's)"),
    seed: int = typer.Option(0, help="seed of random and diverse picks"),
) -> None:
    """Pick the texts the model is least sure about, ask for their labels, store them append-only, retrain a probe."""
    from pathlib import Path

    from keel.io import run_lock
    from keel.label.session import Session

    if not Path(run_dir).is_dir():
        raise KeelError(f"run directory '{run_dir}' not found; pass the folder `keel run` printed (see runs/)")
    if not 0 <= port <= 65535:
        raise KeelError(f"--port must be 0..65535; got {port}")
    with run_lock(Path(run_dir)):  # one session (or training, or report) writes to a run at a time
        session = Session(run_dir, pool, strategy, batch_size, rounds, seed, text_column)
        if web:
            from keel.label.web import serve

            serve(session, port)
        else:
            from keel.label.terminal import run_terminal

            run_terminal(session)
        from keel.report import write_report

        report = write_report(run_dir)
    out.print(f"{len(session.answers)} labels in {esc(session.store)}; report: {esc(report)}")
