"""DP-SGD: the accountant against Opacus's pinned figure, the budget stops training at the right step,
refusals at validate time, and the accountant state across resume."""

import json

import pytest
import torch
from conftest import TINY_RECIPE, keel, write_toy_csv

from keel.trust import privacy


def test_rdp_accountant_matches_opacus_pinned_figure():
    # Opacus's own test figure: sigma 1.5, q 0.04, 2,250 steps, delta 1e-5 -> RDP epsilon 7.32911
    assert privacy.epsilon_after("rdp", 1.5, 0.04, 2250, 1e-5) == pytest.approx(7.32911, abs=1e-4)
    # PRV is tighter than RDP for the same mechanism
    assert privacy.epsilon_after("prv", 1.5, 0.04, 2250, 1e-5) < 7.32911


def test_steps_within_budget_is_the_last_step_within_it():
    sigma, q, delta, target = 0.9, 0.05, 1e-5, 3.0
    t = privacy.steps_within_budget("rdp", sigma, q, delta, target, 2000)
    assert 0 < t < 2000
    assert (
        privacy.epsilon_after("rdp", sigma, q, t, delta)
        <= target
        < privacy.epsilon_after("rdp", sigma, q, t + 1, delta)
    )
    assert privacy.steps_within_budget("rdp", sigma, q, delta, 1e6, 50) == 50  # a loose budget allows every step


def test_poisson_batches_are_deterministic_and_sized_by_q():
    a, b = privacy.poisson_batch(1000, 0.05, 3, 17), privacy.poisson_batch(1000, 0.05, 3, 17)
    assert a == b and a != privacy.poisson_batch(1000, 0.05, 3, 18)
    sizes = [len(privacy.poisson_batch(1000, 0.05, 0, s)) for s in range(200)]
    assert 45 < sum(sizes) / len(sizes) < 55 and len(set(sizes)) > 5  # variable size, mean q*N


def test_batchnorm_is_refused():
    from keel.errors import RecipeError

    with pytest.raises(RecipeError, match="BatchNorm"):
        privacy.check_model(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)))
    privacy.check_model(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)))


DP = [
    "train.privacy.target_epsilon=3.0",
    "train.privacy.accountant=rdp",
    "train.privacy.noise_multiplier=1.0",
    "train.privacy.delta=1e-3",
]


@pytest.fixture(scope="module")
def dp_work(tmp_path_factory):
    work = tmp_path_factory.mktemp("dp")
    csv = write_toy_csv(work / "toy.csv", n=160)
    (work / "tiny.yaml").write_text(TINY_RECIPE.format(data=csv, epochs=6, every=0))
    return work


@pytest.mark.slow
def test_validate_refuses_delta_at_or_above_one_over_n(dp_work):
    proc = keel("validate", "tiny.yaml", "train.privacy.delta=0.05", cwd=dp_work)
    assert proc.returncode == 2 and "train.privacy.delta" in proc.stderr and "1/N" in proc.stderr
    assert "Traceback" not in proc.stderr
    ok = keel("validate", "tiny.yaml", *DP, cwd=dp_work)
    assert ok.returncode == 0, ok.stderr


@pytest.mark.slow
def test_budget_stops_training_at_the_right_step_and_resume_keeps_the_accountant(dp_work):
    proc = keel("train", "tiny.yaml", *DP, "train.epochs=1", "output.dir=runs/dp", cwd=dp_work, check=True)
    first = json.loads((dp_work / "runs/dp/train.json").read_text())["privacy"]
    n = 96  # 160 rows, 20% validation, 20% test
    assert first["sample_rate"] == pytest.approx(8 / n) and first["steps"] == 12 and not first["budget_exhausted"]
    assert first["epsilon"] == pytest.approx(privacy.epsilon_after("rdp", 1.0, 8 / n, 12, 1e-3))
    # six epochs would exceed epsilon 3 at sigma 1.0: resume with more epochs and the budget stops it
    allowed = privacy.steps_within_budget("rdp", 1.0, 8 / n, 1e-3, 3.0, 72)
    assert 12 < allowed < 72
    proc = keel("train", "tiny.yaml", *DP, "train.epochs=6", "output.dir=runs/dp", "--resume", cwd=dp_work, check=True)
    assert "privacy budget" in proc.stderr and f"stops at step {allowed}" in proc.stderr
    final = json.loads((dp_work / "runs/dp/train.json").read_text())["privacy"]
    assert final["steps"] == allowed and final["budget_exhausted"] and final["noise_multiplier"] == 1.0
    assert final["epsilon"] <= 3.0
    assert final["epsilon"] == pytest.approx(privacy.epsilon_after("rdp", 1.0, 8 / n, allowed, 1e-3))
    steps = [json.loads(x) for x in (dp_work / "runs/dp/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "split" not in r] == list(range(1, allowed + 1))
    state = json.loads(sorted((dp_work / "runs/dp/checkpoints").glob("step-*/state.json"))[-1].read_text())
    assert state["state"]["extra"]["privacy"]["history"]  # JSON, not pickle


@pytest.mark.slow
def test_sigma_is_calibrated_to_the_budget(dp_work):
    proc = keel(
        "run",
        "tiny.yaml",
        "train.privacy.target_epsilon=4.0",
        "train.privacy.delta=1e-3",
        "train.epochs=2",
        "output.dir=runs/dp-cal",
        cwd=dp_work,
        check=True,
    )
    p = json.loads((dp_work / "runs/dp-cal/train.json").read_text())["privacy"]
    assert p["accountant"] == "prv" and p["steps"] == p["planned_steps"] == 24 and not p["budget_exhausted"]
    assert 3.9 < p["epsilon"] <= 4.0 + 1e-6  # the smallest sigma whose epsilon stays within the budget
    page = (dp_work / "runs/dp-cal/report.html").read_text()
    assert "<h2>Privacy</h2>" in page and "epsilon" in page
    card = (dp_work / "runs/dp-cal/model/MODEL_CARD.md").read_text()
    assert "DP-SGD" in card and f"{p['noise_multiplier']:.4f}" in card
    assert "Traceback" not in proc.stderr


def test_a_logical_batch_in_chunks_gets_the_same_clipped_gradient():
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    x, y = torch.randn(10, 4, generator=torch.Generator().manual_seed(0)), torch.arange(10) % 3

    def update(chunk_size):
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 3)
        gs = GradSampleModule(net)
        opt = DPOptimizer(
            torch.optim.SGD(net.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=10
        )
        before = net.weight.detach().clone()
        loss = privacy.clipped_backward(
            opt, list(range(10)), chunk_size, lambda c: torch.nn.functional.cross_entropy(gs(x[c]), y[c])
        )
        opt.step()
        return net.weight.detach() - before, loss

    whole, loss_whole = update(10)
    chunked, loss_chunked = update(3)
    assert whole.abs().sum() > 0
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-5)
    assert loss_chunked == pytest.approx(loss_whole, rel=1e-5)


def _validate_in_process(work, *overrides) -> str:
    """`keel validate` run in a fresh interpreter; prints which heavy modules it imported."""
    import os
    import subprocess
    import sys

    from conftest import OFFLINE

    code = (
        "import runpy, sys\n"
        f"sys.argv = ['keel', 'validate', 'tiny.yaml', *{list(overrides)!r}]\n"
        "try:\n    runpy.run_module('keel', run_name='__main__')\nexcept SystemExit as e:\n    print('exit', e.code)\n"
        "print('imported:', sorted(m for m in ('torch', 'transformers', 'opacus') if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **OFFLINE},
    )
    return proc.stdout + proc.stderr


def test_validate_on_a_dp_recipe_imports_no_torch(dp_work):
    ok = _validate_in_process(dp_work, *DP)
    assert "ok tiny.yaml" in ok and "imported: []" in ok, ok
    refused = _validate_in_process(dp_work, "train.privacy.delta=0.05")  # decided by reading the whole file
    assert "1/N" in refused and "imported: []" in refused, refused


@pytest.mark.slow
def test_fixed_size_batches_are_refused_not_reported_as_poisson(dp_work):
    proc = keel("validate", "tiny.yaml", *DP, "train.privacy.poisson_sampling=false", cwd=dp_work)
    assert proc.returncode == 2 and "train.privacy.poisson_sampling" in proc.stderr and "Poisson" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = keel("train", "tiny.yaml", *DP, "train.privacy.poisson_sampling=false", "output.dir=runs/fixed", cwd=dp_work)
    assert proc.returncode == 2 and not (dp_work / "runs/fixed").exists()


def test_person_level_clipping_bounds_a_persons_rows_together():
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1, bias=False)
    gs = GradSampleModule(net)
    C, sigma = 0.5, 1.3
    args = privacy.dp_optimizer_args(sigma, C, 2)
    opt = DPOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), **args, expected_batch_size=1)
    assert opt.noise_multiplier * opt.max_grad_norm == pytest.approx(sigma * C)  # the noise is sigma * C
    opt.noise_multiplier = 0.0  # measure the clipped sum alone
    x = torch.full((2, 4), 100.0)  # one person's text and its copy, both with huge gradients in the same direction
    before = net.weight.detach().clone()
    gs(x).mean().backward()
    opt.step()
    assert float((net.weight.detach() - before).norm()) == pytest.approx(C, rel=1e-4)  # C/2 + C/2, not 2C


PEOPLE = ["he", "she", "my mother", "my father", "a christian", "a muslim", "the driver", "the rider"]


@pytest.mark.slow
def test_dp_with_counterfactual_augmentation_accounts_per_person(dp_work):
    import random

    rng = random.Random(0)
    rows = ["text,label"] + [
        f"{rng.choice(PEOPLE)} said the ride was {'great' if i % 2 == 0 else 'awful'} number {i},"
        f"{'pos' if i % 2 == 0 else 'neg'}"
        for i in range(160)
    ]
    (dp_work / "people.csv").write_text("\n".join(rows) + "\n")
    proc = keel(
        "train",
        "tiny.yaml",
        *DP,
        f"data.path={dp_work / 'people.csv'}",
        "train.epochs=1",
        "audit.fairness.mitigation=counterfactual-augmentation",
        "output.dir=runs/dp-cda",
        cwd=dp_work,
        check=True,
    )
    p = json.loads((dp_work / "runs/dp-cda/train.json").read_text())["privacy"]
    n = 96  # persons: the training texts before augmentation
    assert p["unit"] == "person" and p["persons"] == n and n < p["rows"] < 2 * n and p["rows_per_person"] == 2
    assert p["sample_rate"] == pytest.approx(8 / n) and p["steps"] == 12  # q and the epoch count persons, not rows
    assert p["row_clip"] == pytest.approx(0.5)
    assert p["epsilon"] == pytest.approx(privacy.epsilon_after("rdp", 1.0, 8 / n, 12, 1e-3))
    assert "privacy is per person" in proc.stderr
    from keel.trust.card import model_card

    card = model_card(dp_work / "runs/dp-cda")
    assert "privacy for each person" in card and "counterfactual copy" in card and "96 persons" in card


def test_the_card_names_the_unit_the_guarantee_protects():
    from keel.trust.card import privacy_lines

    base = {
        "epsilon": 2.0,
        "delta": 1e-5,
        "accountant": "rdp",
        "noise_multiplier": 1.1,
        "sample_rate": 0.01,
        "steps": 10,
        "max_grad_norm": 1.0,
        "target_epsilon": 3.0,
    }
    assert "privacy for each training example" in privacy_lines(base)[0]
    assert "privacy for each training block of tokens" in privacy_lines({**base, "unit": "block"})[0]
    person = privacy_lines({**base, "unit": "person", "persons": 96, "rows": 150, "row_clip": 0.5})[0]
    assert "privacy for each person" in person and "clipped at 0.5000" in person and "(Poisson, of persons)" in person


@pytest.mark.slow
def test_early_stopping_min_delta_applies_to_dp_runs(dp_work, monkeypatch):
    """Validation macro-F1 scripted to rise by 0.01 an epoch: with min_delta 0.05 that is no improvement, so
    patience 1 stops the DP run after its second evaluation (the old DP loop ignored min_delta and ran on)."""
    from keel.recipe import load_recipe
    from keel.tasks import classification
    from keel.train.engine import train

    scores = iter([0.50, 0.51, 0.52, 0.53])

    def scripted(*args, **kwargs):
        value = next(scores)
        return {"loss": 1.0 - value, "accuracy": value, "macro_f1": value}

    monkeypatch.setattr(classification, "evaluate", scripted)
    recipe = load_recipe(
        str(dp_work / "tiny.yaml"),
        [*DP, "train.epochs=3", "train.early_stopping.patience=1", "train.early_stopping.min_delta=0.05"],
    )
    summary = train(recipe, dp_work / "runs/dp-min-delta")
    evals = [
        json.loads(x) for x in (dp_work / "runs/dp-min-delta/metrics.jsonl").read_text().splitlines() if '"split"' in x
    ]
    assert [e["macro_f1"] for e in evals] == [0.50, 0.51]
    assert summary["stopped_early"] and summary["best_step"] == 12 and summary["steps"] == 24
    assert summary["privacy"]["steps"] == 24  # the accountant counted the steps taken, not the planned 36


@pytest.mark.slow
def test_dp_resume_from_a_mid_epoch_checkpoint_replays_the_same_steps(dp_work):
    import shutil

    from safetensors.torch import load_file

    args = [*DP, "train.epochs=2", "train.checkpoint_every=5", "train.keep_last_k=100"]
    keel("train", "tiny.yaml", *args, "output.dir=runs/dp-ref", cwd=dp_work, check=True)
    ref = dp_work / "runs/dp-ref"
    copy = dp_work / "runs/dp-resumed"
    shutil.copytree(ref, copy)
    shutil.rmtree(copy / "model")
    for ckpt in (copy / "checkpoints").glob("step-*"):
        if ckpt.name > "step-00000015":  # resume from step 15, mid-way through epoch 2
            shutil.rmtree(ckpt)
    proc = keel("train", "tiny.yaml", *args, "output.dir=runs/dp-resumed", "--resume", cwd=dp_work, check=True)
    assert "resuming from step-00000015" in proc.stderr

    def steps(run):
        return [
            (r["step"], r["loss"], r["batch"])
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "split" not in r
        ]

    assert steps(copy) == steps(ref)
    a, b = (json.loads((run / "train.json").read_text())["privacy"] for run in (ref, copy))
    assert a["epsilon"] == b["epsilon"] and a["steps"] == b["steps"] == 24
    wa, wb = load_file(str(ref / "model/model.safetensors")), load_file(str(copy / "model/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the noise (torch's RNG) replays too
