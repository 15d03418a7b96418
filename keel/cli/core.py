"""Recipe and run verbs: validate, run, train, eval, predict, report, ls, init, recipe fields, quickstart."""

from __future__ import annotations

import json
import sys

import typer

from keel.cli._app import LOCAL_RAY, OVERRIDES, RECIPE, app, load
from keel.cli.results import print_eval, print_results
from keel.errors import KeelError
from keel.progress import esc, out


@app.command()
def validate(recipe: str = RECIPE, overrides: list[str] | None = OVERRIDES) -> None:
    """Check a recipe (types, names, files, columns) without loading any model."""
    from keel.pipeline import check_recipe
    from keel.recipe import load_recipe

    r = load_recipe(recipe, overrides)
    check_recipe(r)
    out.print(
        f"[green]ok[/] {esc(recipe)}: task {r.task}, model {esc(r.model.name)}, data {esc(r.data.name or r.data.path)}, "
        f"sha256 {r.sha256()[:12]}"
    )


@app.command()
def run(
    recipe: str = RECIPE,
    overrides: list[str] | None = OVERRIDES,
    resume: bool = typer.Option(False, "--resume", help="continue from the last complete checkpoint"),
) -> None:
    """Everything the recipe asks for: train, evaluate on the test split, write report.html."""
    from keel.pipeline import full_run

    r = load(recipe, overrides)
    run_dir = full_run(r, resume=resume)
    print_results(run_dir)


@app.command()
def train(
    recipe: str = RECIPE,
    overrides: list[str] | None = OVERRIDES,
    resume: bool = typer.Option(False, "--resume", help="continue from the last complete checkpoint"),
    ray: str | None = typer.Option(
        None,
        "--ray",
        metavar="[ADDRESS]",
        help="train in Ray Train workers (train.parallel.ray), on the cluster at ADDRESS or a new local one",
    ),
) -> None:
    """Train only; the model lands in RUN_DIR/model."""
    from keel.pipeline import train_run

    r = load(recipe, overrides)
    if ray is not None:
        from keel.raytrain import train_on_ray

        run_dir = train_on_ray(r, None if ray == LOCAL_RAY else ray, resume=resume)
    else:
        run_dir = train_run(r, resume=resume)
    from keel.progress import is_main_process

    if is_main_process():
        out.print(f"trained: [bold]{esc(run_dir)}[/]   next: keel eval {esc(run_dir)}")


@app.command("eval")
def eval_(
    run_dir: str = typer.Argument(..., help="a run directory"),
    data: str | None = typer.Option(
        None,
        "--data",
        help="a labelled CSV/JSONL/Parquet file; for causal-lm runs a "
        "file in the run's own format (text, chats, or preference pairs)",
    ),
    text_column: str | None = typer.Option(None, help="text column of --data (default: the recipe's)"),
    label_column: str | None = typer.Option(None, help="label column of --data (default: the recipe's)"),
    backend: str = typer.Option(
        "torch",
        help="torch, onnx, onnx-int8 (after `keel export`) or a compressed variant such as pruned-onnx-int8 (see `keel bench`)",
    ),
    as_json: bool = typer.Option(False, "--json", help="print the metrics as JSON"),
) -> None:
    """Evaluate a run's model on its test split, or on a file (labelled texts; text, chats or pairs for causal LMs)."""
    from keel.evaluate import evaluate_run

    columns = {k: v for k, v in (("text", text_column), ("label", label_column)) if v}
    if columns and not data:
        raise KeelError("--text-column/--label-column go with --data FILE")
    result = evaluate_run(run_dir, data, columns, backend)
    if as_json:
        out.print_json(json.dumps(result))
        return
    print_eval(result)


@app.command()
def predict(
    run_dir: str = typer.Argument(..., help="a run directory"),
    texts: list[str] = typer.Argument(..., help="texts to classify; a single - reads one text per line from stdin"),
    backend: str = typer.Option(
        "torch",
        help="torch, onnx, onnx-int8 (after `keel export`) or a compressed variant such as pruned-onnx-int8 (see `keel bench`)",
    ),
    as_json: bool = typer.Option(False, "--json", help="print JSON lines"),
) -> None:
    """Classify texts with a run's model."""
    from rich.table import Table

    from keel.evaluate import predict as _predict

    if texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
        if not texts:
            raise KeelError("predict: no text on stdin; pipe one text per line, or pass texts as arguments")
    results = _predict(run_dir, texts, backend=backend)
    if as_json:
        for r in results:
            print(json.dumps(r))
        return
    from rich.text import Text

    table = Table("text", "label", "score")
    for r in results:  # Text cells: texts and labels are printed as typed, never parsed as markup
        table.add_row(Text(r["text"][:80]), Text(r["label"]), f"{r['score']:.3f}")
    out.print(table)


@app.command()
def report(run_dir: str = typer.Argument(..., help="a run directory")) -> None:
    """(Re)build RUN_DIR/report.html from the files in the run directory."""
    from pathlib import Path

    from keel.report import write_report

    if not Path(run_dir).is_dir():
        raise KeelError(f"run directory '{run_dir}' not found")
    out.print(f"wrote {esc(write_report(run_dir))}")


@app.command("ls")
def ls() -> None:
    """Built-in models, data sets and recipes."""
    from rich.table import Column, Table

    from keel.data.builtin import DATASETS
    from keel.models.registry import MODELS
    from keel.recipe import builtin_recipes

    t = Table(Column("model", no_wrap=True), "kind", "params", "from package", "description", title="models")
    for m in MODELS.values():
        t.add_row(m.name, m.kind, m.params, m.source, m.description)
    out.print(t)
    t = Table(Column("data set", no_wrap=True), "task", "license", "from package", "description", title="data sets")
    for d in DATASETS.values():
        t.add_row(d.name, d.task, d.license, d.package, d.description)
    out.print(t)
    t = Table("recipe", "file", title="recipes")
    for name, path in builtin_recipes().items():
        t.add_row(name, str(path))
    out.print(t)
    out.print(
        "any local Hugging Face model folder works as model.name; any CSV/JSONL/Parquet file as data.path; "
        "start your own recipe from one of these with keel init NAME"
    )


@app.command()
def init(name: str = typer.Argument("quickstart", help="the built-in recipe to start from (see `keel ls`)")) -> None:
    """Write NAME.yaml here: a commented copy of a built-in recipe to edit (an existing file is never replaced)."""
    from pathlib import Path

    from keel.recipe_fields import init_recipe

    path = init_recipe(name, Path.cwd())
    out.print(
        f"wrote {esc(path.name)} (from the built-in recipe '{esc(name)}')   next: edit it, then "
        f"keel validate {esc(path.name)} and keel run {esc(path.name)}; every field: keel recipe fields"
    )


recipe_app = typer.Typer(no_args_is_help=True, help="Recipe reference: `keel recipe fields [SECTION]`.")
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("fields")
def recipe_fields(
    section: str | None = typer.Argument(
        None, help="a section such as train, train.privacy or audit.fairness (default: every field)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the fields as JSON"),
) -> None:
    """Every recipe field with its type, default and description, read from the recipe schema itself."""
    from rich.table import Column, Table
    from rich.text import Text

    from keel.recipe_fields import section_fields

    rows = section_fields(section)
    if as_json:
        print(json.dumps([{k: v for k, v in r.items() if k != "section"} for r in rows], indent=1))
        return
    table = Table(Column("field", no_wrap=True), "type", "default", "description", title=section or "recipe fields")
    for r in rows:
        table.add_row(
            Text(r["path"], style="bold" if r["section"] else ""),
            Text(r["type"]),
            Text(r["default"]),
            Text(r["description"]),
        )
    out.print(table)


@app.command()
def quickstart(overrides: list[str] | None = OVERRIDES) -> None:
    """Fine-tune minilm-l6 on 2,400 tweets (about 4 minutes on 2 CPU cores), evaluate, write the report."""
    from keel.pipeline import full_run

    r = load("quickstart", overrides)
    run_dir = full_run(r)
    print_results(run_dir)
