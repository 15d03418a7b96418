"""The shared `keel` Typer app, its root options and the argument types every verb module uses."""

from __future__ import annotations

import typer

from keel.api import offline_defaults

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="keel: from a data set to a trained, evaluated transformer. Start with `keel quickstart`.",
)
state = {"debug": False}

RECIPE = typer.Argument(..., help="a recipe .yaml file, or the name of a built-in recipe (see `keel ls`)")
OVERRIDES = typer.Argument(None, help="key.path=value overrides, e.g. train.lr=1e-4 data.max_train_samples=500")
LOCAL_RAY = "local"  # `keel train RECIPE --ray` with no address: a new local Ray cluster


def optional_ray_address(args: list[str]) -> list[str]:
    """`--ray` may stand without its ADDRESS (click options always take one): then it means a new local cluster.
    What follows is an address unless it is an option, an override (key=value) or a recipe file."""
    verb = next((a for a in args if not a.startswith("-")), None)
    if verb != "train" or "--ray" not in args:  # `keel serve --ray` is a plain flag (RAY_ADDRESS names a cluster)
        return args
    i = args.index("--ray")
    nxt = args[i + 1] if i + 1 < len(args) else None
    if nxt is None or nxt.startswith("-") or "=" in nxt or nxt.endswith((".yaml", ".yml")):
        return [*args[: i + 1], LOCAL_RAY, *args[i + 1 :]]
    return args


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show full tracebacks")) -> None:
    state["debug"] = debug
    offline_defaults()
    import logging

    from keel.progress import setup_logging

    setup_logging(debug)
    # one handler prints each line: a library's logging.basicConfig() during a verb (ONNX Runtime's quantizer calls
    # it) must not print keel's lines a second time through the root logger
    logging.getLogger("keel").propagate = False


def load(recipe: str, overrides):
    from keel.recipe import load_recipe

    return load_recipe(recipe, overrides)
