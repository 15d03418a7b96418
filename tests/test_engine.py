"""Training-loop options, each through the real CLI on the tiny model."""

import json
import math

import pytest
from conftest import keel

pytestmark = pytest.mark.slow  # trains models


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(tmp_path, recipe, *overrides):
    keel("train", str(recipe), "output.dir=runs/x", *overrides, cwd=tmp_path, check=True)
    return records(tmp_path / "runs" / "x")


def test_early_stopping(tmp_path, tiny_recipe):
    # a learning rate this small cannot move macro-F1: no improvement after the first evaluation
    recs = train(tmp_path, tiny_recipe(epochs=10), "train.lr=1e-12", "train.early_stopping.patience=2")
    evals = [r for r in recs if r.get("split") == "validation"]
    assert len(evals) == 3  # best at epoch 1, then 2 without improvement
    summary = json.loads((tmp_path / "runs/x/train.json").read_text())
    assert summary["stopped_early"] and summary["best_step"] == 9


def test_gradient_accumulation_and_max_steps(tmp_path, tiny_recipe):
    recs = train(tmp_path, tiny_recipe(epochs=3), "train.grad_accum_steps=2", "train.max_steps=7")
    steps = [r for r in recs if "split" not in r]
    assert [r["step"] for r in steps] == list(range(1, 8))
    assert steps[0]["samples"] == 16  # two micro-batches of 8 per optimiser step
    assert steps[4]["samples"] == 16 * 4 + 8  # 9 micro-batches per epoch: the epoch's last step has one


def test_cosine_schedule_with_warmup(tmp_path, tiny_recipe):
    recs = train(tmp_path, tiny_recipe(epochs=2), "train.schedule=cosine", "train.warmup_ratio=0.25", "train.lr=1e-3")
    lrs = [r["lr"] for r in recs if "split" not in r]
    total, warm = len(lrs), round(0.25 * len(lrs))
    assert lrs[warm - 1] == pytest.approx(1e-3)  # peak at the end of warm-up
    assert all(a < b for a, b in zip(lrs[: warm - 1], lrs[1:warm]))
    k = total // 2 + warm // 2
    assert lrs[k - 1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * (k - warm) / (total - warm))))
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_bf16_autocast_on_cpu(tmp_path, tiny_recipe):
    recipe = tiny_recipe(epochs=1)
    recs = train(tmp_path, recipe, "train.mixed_precision=bf16")
    steps = [r for r in recs if "split" not in r]
    assert steps and all(math.isfinite(r["loss"]) for r in steps)
    # autocast really ran: the same seed and data in fp32 give a different (unrounded) first loss
    keel("train", str(recipe), "output.dir=runs/fp32", cwd=tmp_path, check=True)
    fp32 = [r for r in records(tmp_path / "runs" / "fp32") if "split" not in r]
    assert steps[0]["loss"] != fp32[0]["loss"] and abs(steps[0]["loss"] - fp32[0]["loss"]) < 0.05
    # weights are saved in full precision
    cfg = json.loads((tmp_path / "runs/x/model/config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) in (None, "float32")


def test_run_without_validation_or_test_split(tmp_path, tiny_recipe):
    proc = keel(
        "run",
        str(tiny_recipe(epochs=1)),
        "data.split.validation=0",
        "data.split.test=0",
        "output.dir=runs/x",
        cwd=tmp_path,
        check=True,
    )
    run_dir = tmp_path / "runs" / "x"
    assert (run_dir / "model" / "model.safetensors").is_file() and (run_dir / "report.html").is_file()
    assert not (run_dir / "eval" / "test.json").exists() and "skipping the test evaluation" in proc.stderr
    assert not [r for r in records(run_dir) if r.get("split") == "validation"]


def test_length_grouped_order_batches_similar_lengths():
    import random

    from keel.train.strategies import epoch_order, shard_batches

    rng = random.Random(0)
    lengths = [rng.randint(3, 64) for _ in range(1000)]
    order = epoch_order(len(lengths), 42, 0, lengths, 16)
    assert sorted(order) == list(range(1000))  # every example, once
    assert order == epoch_order(len(lengths), 42, 0, lengths, 16)  # seeded: a resumed run replays it
    assert order != epoch_order(len(lengths), 42, 1, lengths, 16)  # reshuffled every epoch
    batches = shard_batches(order, 16, 0, 1)
    padded = lambda bs: sum(max(lengths[i] for i in b) * len(b) for b in bs)  # noqa: E731
    random_batches = shard_batches(epoch_order(len(lengths), 42, 0), 16, 0, 1)
    assert padded(batches) < 1.1 * sum(lengths) < padded(random_batches)
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest batch first: out of memory early


def test_group_by_length_trains_and_old_checkpoints_still_resume(tmp_path, tiny_recipe):
    from keel.recipe import load_recipe
    from keel.train.engine import check_resume_compatible

    recs = train(tmp_path, tiny_recipe(epochs=1), "train.group_by_length=true")
    steps = [r for r in recs if "split" not in r]
    assert steps and all(math.isfinite(r["loss"]) for r in steps)
    # a checkpoint written before the field existed resumes: the absent field reads as its default
    recipe = load_recipe(str(tiny_recipe(epochs=1)))
    saved = (tmp_path / "runs/x/recipe.yaml").read_text().replace("  group_by_length: true\n", "")
    assert "group_by_length:" not in saved
    assert "train.group_by_length" not in check_resume_compatible(saved, recipe)
    with pytest.raises(Exception, match="train.group_by_length"):
        check_resume_compatible((tmp_path / "runs/x/recipe.yaml").read_text(), recipe)
