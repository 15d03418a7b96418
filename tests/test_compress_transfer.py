"""The distillation transfer set (keel/compress/transfer.py): more training rows, never a held-out one."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import TINY_RECIPE, write_toy_csv

TEACHER_ROWS, TRANSFER = 30, 90


def _recipe(work, csv, transfer: int | None = None):
    from keel.recipe import load_recipe

    text = TINY_RECIPE.format(data=csv, epochs=1, every=0)
    if transfer:
        text += (
            f"compress:\n  distill: {{epochs: 0, transfer_samples: {transfer}}}\n"
            "  prune: {ffn: 0.5, vocab: true, finetune_epochs: 1, lr: 1.0e-3}\n"
        )
    (work / "tiny.yaml").write_text(text)
    return load_recipe(work / "tiny.yaml", [f"data.max_train_samples={TEACHER_ROWS}"])


@pytest.fixture
def teacher_run(tmp_path):
    """A finished tiny run (random tiny-bert) that froze 30 of the source's 120 training rows, made without training."""
    from transformers import AutoTokenizer

    from keel.data.load import load_splits
    from keel.data.splits import freeze
    from keel.models import model_dir
    from keel.rundir import start
    from keel.tasks.classification import build_model
    from keel.train.engine import save_final_model

    csv = write_toy_csv(tmp_path / "toy.csv", n=200)
    recipe = _recipe(tmp_path, csv, TRANSFER)
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    raw = load_splits(recipe.data, recipe.task)
    assert len(raw.train) == TEACHER_ROWS
    freeze(run_dir, raw)
    start(recipe, run_dir, False)
    torch.manual_seed(0)
    model = build_model(model_dir("tiny-bert"), raw.labels)
    summary = {"labels": raw.labels, "best_step": 0, "selection_metric": "accuracy", "best_metric": 0.0}
    save_final_model(model, AutoTokenizer.from_pretrained(model_dir("tiny-bert")), run_dir / "model", recipe, summary)
    return run_dir, recipe, csv


def _stage_recipe(recipe, n):
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"max_train_samples": n})})


def test_the_transfer_set_is_a_superset_of_the_teachers_rows_and_holds_no_held_out_text(teacher_run, caplog):
    from keel.compress.transfer import transfer_splits
    from keel.data.splits import load_frozen

    run_dir, recipe, csv = teacher_run
    frozen = load_frozen(run_dir)
    got = transfer_splits(run_dir, _stage_recipe(recipe, TRANSFER))
    assert len(got.train) == TRANSFER
    assert set(frozen.train["text"]) < set(got.train["text"])  # the teacher's rows and more of the same split
    held_out = set(frozen.validation["text"]) | set(frozen.test["text"])
    assert not held_out & set(got.train["text"])
    assert list(got.validation["text"]) == list(frozen.validation["text"])
    assert list(got.test["text"]) == list(frozen.test["text"])
    assert transfer_splits(run_dir, _stage_recipe(recipe, TEACHER_ROWS)) is None  # the frozen rows serve

    # an edited source could re-split differently: the stage keeps to the frozen rows, and says so
    csv.write_text(csv.read_text().replace("number 7,", "number seven,"))
    with caplog.at_level(logging.WARNING, logger="keel.compress.transfer"):
        assert transfer_splits(run_dir, _stage_recipe(recipe, TRANSFER)) is None
    assert "changed since the run froze its splits" in caplog.text
    assert f"distilling on the {TEACHER_ROWS} frozen training rows" in caplog.text


def test_the_pruning_stage_trains_on_the_transfer_set_and_keeps_the_runs_validation(teacher_run):
    from keel.compress.stages import prune
    from keel.data.splits import load_frozen
    from keel.runtime.load import load_trained

    run_dir, recipe, _ = teacher_run
    stage = prune(run_dir, recipe)
    counts = json.loads((stage / "train.json").read_text())["data"]["counts"]
    assert counts["train"] == TRANSFER  # before: the run's 30 frozen rows, whatever transfer_samples said
    mine, teachers = load_frozen(stage), load_frozen(run_dir)
    assert list(mine.validation["text"]) == list(teachers.validation["text"])
    assert list(mine.test["text"]) == list(teachers.test["text"])
    # the trimmed vocabulary keeps the tokens of every text the stage trained on
    tok = load_trained(run_dir).tokenizer
    kept = json.loads((stage / "model" / "keel.json").read_text())["vocab"]["tokens_kept"]
    seen = {i for ids in tok(list(mine.train["text"]))["input_ids"] for i in ids} | set(tok.all_special_ids)
    assert kept == len(seen)
