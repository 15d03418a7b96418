"""What the simulation, the server and every site need alike: the recipe's federated section, the data and
the model to start from, and each site's local training settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from keel.errors import KeelError
from keel.federated import privacy
from keel.recipe import Recipe


def fed_section(recipe: Recipe):
    if recipe.federated is None:
        raise KeelError(
            "the recipe has no federated: section; add one (the built-in recipe `federated` is an example: keel ls)"
        )
    return recipe.federated  # its task and site counts are checked by the recipe schema


def quiet_flower(debug: bool = False) -> None:
    """Flower logs every protocol step (and deprecation notices); keel logs one line per round instead."""
    import os

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    logging.getLogger("flwr").setLevel(logging.INFO if debug else logging.ERROR)


def data_recipe(recipe: Recipe) -> Recipe:
    """For partition.kind=column the site column travels with the data as its `group` column."""
    fed = recipe.federated
    if fed is None or fed.partition.kind != "column":
        return recipe
    from keel.data.load import check_data_config, column_mapping
    from keel.recipe import Columns

    cols = {**column_mapping(recipe.data, recipe.task), "group": fed.partition.column}
    out = recipe.model_copy(update={"data": recipe.data.model_copy(update={"columns": Columns(**cols)})})
    try:
        check_data_config(out.data, out.task)
    except KeelError as e:  # name the field the user set
        raise type(e)(str(e).replace("data.columns.group", "federated.partition.column")) from None
    return out


@dataclass
class Setup:
    recipe: Recipe
    tokenizer: object
    data: object  # keel.data.prepare.Prepared
    model_path: Path


def setup(recipe: Recipe) -> Setup:
    from transformers import AutoTokenizer

    from keel.data.prepare import prepare_data
    from keel.models import model_dir

    path = model_dir(recipe.model.name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Setup(recipe, tokenizer, prepare_data(data_recipe(recipe), tokenizer), Path(path))


def build_model(s: Setup, labels: list[str]):
    from keel.tasks import get_task

    return get_task("classification").build_model(s.model_path, labels)


def site_partitions(s: Setup) -> list[list[int]]:
    from keel.federated.partition import partition

    fed, train = s.recipe.federated, s.data.splits["train"]
    groups = train["group"] if fed.partition.kind == "column" else None
    return partition(train["label"], fed.sites, fed.partition.kind, fed.partition.alpha, fed.partition.seed, groups)


def site_settings(recipe: Recipe) -> dict:
    fed, t = recipe.federated, recipe.train
    return {
        "batch_size": t.batch_size,
        "lr": fed.local_lr or t.lr,
        "optimizer": fed.local_optimizer,
        "max_grad_norm": t.max_grad_norm,
        "seed": t.seed,
        "local_epochs": fed.local_epochs,
        "local_dp": privacy.local_noise(fed),
    }


# -- round checkpoints ------------------------------------------------------------------------------
