"""Data verbs: `keel data curate RECIPE` (keel/data/curate)."""

from __future__ import annotations

import json

import typer

from keel.cli._app import OVERRIDES, RECIPE, app, load
from keel.errors import RecipeError
from keel.progress import esc, out

data_app = typer.Typer(no_args_is_help=True, help="Data tools: `keel data curate RECIPE`.")
app.add_typer(data_app, name="data")


@data_app.command("curate")
def curate(recipe: str = RECIPE, overrides: list[str] | None = OVERRIDES) -> None:
    """Split and curate the recipe's data as `keel run` would (data.curate), and print what each step did."""
    from keel.data.curate import CURATE_JSON, curate_splits
    from keel.data.load import load_splits
    from keel.pipeline import check_recipe

    r = load(recipe, overrides)
    if r.data.curate is None:
        raise RecipeError("data.curate: this recipe has no data.curate section; add `curate: {}` under data:")
    check_recipe(r)
    raw = load_splits(r.data, r.task)
    _, folder = curate_splits(raw, r.data.curate, r.task)
    doc = json.loads((folder / CURATE_JSON).read_text())
    splits = ("train", "validation", "test")
    out.print(f"{'step':<16}" + "".join(f"{s:>12}" for s in splits))
    out.print(f"{'source split':<16}" + "".join(f"{doc['before'][s]:>12,}" for s in splits))
    for step in doc["steps"]:
        out.print(f"{step['step']:<16}" + "".join(f"{step['after'][s]:>12,}" for s in splits))
    if "pii" in doc:
        found = ", ".join(f"{k} {v:,}" for k, v in doc["pii"]["counts"].items() if v) or "none"
        out.print(f"PII replaced: {esc(found)} (not scrubbed: {esc(', '.join(doc['pii']['not_scrubbed']))})")
    if "quality" in doc:
        failed = ", ".join(f"{k} {v:,}" for k, v in doc["quality"]["rules"].items() if v) or "none"
        out.print(f"quality rules failed: {esc(failed)}")
    if "label_errors" in doc:
        e = doc["label_errors"]
        out.print(f"label errors: {e['found']:,}" + (f" ({esc(e['action'])})" if "action" in e else ""))
    out.print(f"curated splits and {CURATE_JSON} in {esc(folder)}")
