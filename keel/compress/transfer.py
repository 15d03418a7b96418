"""The distillation transfer set: more of the training split than the teacher saw, for the teacher to label.

A run freezes the rows it trained on (keel/data/splits.py), the training split capped at ``data.max_train_samples``.
``compress.distill.transfer_samples`` asks for more rows of the same shuffled training split, so they are read
from the source again with the cap raised, and only when that is safe: the source must be the one the run froze
(same content hash) and its re-split must give exactly the frozen validation and test rows, so no validation or
test text reaches a student. The rows are frozen in the stage's own folder, which every later reader of the
stage then finds first:

    runs/<name>/compress/<stage>/splits/   train: the transfer rows; validation, test: the run's own frozen rows

Where it is not safe (the source is gone or changed), the stage distils on the frozen rows and says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

from keel.data.load import RawSplits, load_splits
from keel.data.splits import load_frozen
from keel.errors import DataError
from keel.recipe import Recipe
from keel.rundir import splits_dir

logger = logging.getLogger(__name__)


def transfer_splits(run_dir: Path, recipe: Recipe) -> RawSplits | None:
    """The splits a compression stage trains on when ``recipe`` (the stage's: ``data.max_train_samples`` is the
    transfer set's size) asks for more training rows than ``run_dir`` froze; None when the frozen rows serve."""
    want = recipe.data.max_train_samples
    if recipe.task != "classification" or not want or splits_dir(run_dir) is None:
        return None  # a run from before frozen splits re-splits its source with the stage's cap, as it always did
    frozen = load_frozen(run_dir)
    if want <= len(frozen.train):
        return None

    def frozen_only(why: str) -> None:
        logger.warning(
            f"distill: compress.distill.transfer_samples asks for {want:,} training texts but {why}; "
            f"distilling on the {len(frozen.train):,} frozen training rows"
        )

    try:
        fresh = load_splits(recipe.data, recipe.task)
    except DataError as e:
        return frozen_only(f"the source cannot be read again ({e})")
    if fresh.content_sha256 != frozen.content_sha256:
        return frozen_only(f"{fresh.source} changed since the run froze its splits")
    if recipe.data.curate is not None:  # the frozen rows were curated: the new ones are too (cached by content)
        from keel.data.curate import curate_splits

        fresh, _ = curate_splits(fresh, recipe.data.curate, recipe.task)
    for name in ("validation", "test"):
        if list(getattr(fresh, name)["text"]) != list(getattr(frozen, name)["text"]):
            return frozen_only(f"re-splitting {fresh.source} does not give the run's frozen {name} rows")
    held_out = set(frozen.validation["text"]) | set(frozen.test["text"])
    train = fresh.train[~fresh.train["text"].isin(held_out)].reset_index(drop=True)
    if len(train) <= len(frozen.train):
        return None  # the source holds no training row the run did not freeze
    logger.info(
        f"distill: {len(train):,} training-split texts for the teacher to label "
        f"(the teacher trained on {len(frozen.train):,} of them)"
    )
    note = f"transfer set: {len(train):,} rows of the training split (compress.distill.transfer_samples)"
    return RawSplits(
        train,
        frozen.validation,
        frozen.test,
        frozen.labels,
        frozen.source,
        frozen.content_sha256,
        [*frozen.notes, note],
    )
