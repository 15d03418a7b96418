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
    assert privacy.epsilon_after("rdp", sigma, q, t, delta) <= target < privacy.epsilon_after("rdp", sigma, q, t + 1, delta)
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


DP = ["train.privacy.target_epsilon=3.0", "train.privacy.accountant=rdp", "train.privacy.noise_multiplier=1.0",
      "train.privacy.delta=1e-3"]


@pytest.fixture(scope="module")
def dp_work(tmp_path_factory):
    work = tmp_path_factory.mktemp("dp")
    csv = write_toy_csv(work / "toy.csv", n=160)
    (work / "tiny.yaml").write_text(TINY_RECIPE.format(data=csv, epochs=6, every=0))
    return work


def test_validate_refuses_delta_at_or_above_one_over_n(dp_work):
    proc = keel("validate", "tiny.yaml", "train.privacy.delta=0.05", cwd=dp_work)
    assert proc.returncode == 2 and "train.privacy.delta" in proc.stderr and "1/N" in proc.stderr
    assert "Traceback" not in proc.stderr
    ok = keel("validate", "tiny.yaml", *DP, cwd=dp_work)
    assert ok.returncode == 0, ok.stderr


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


def test_sigma_is_calibrated_to_the_budget(dp_work):
    proc = keel("run", "tiny.yaml", "train.privacy.target_epsilon=4.0", "train.privacy.delta=1e-3", "train.epochs=2",
                "output.dir=runs/dp-cal", cwd=dp_work, check=True)
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
        opt = DPOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=0.5,
                          expected_batch_size=10)
        before = net.weight.detach().clone()
        loss = privacy.clipped_backward(opt, list(range(10)), chunk_size,
                                        lambda c: torch.nn.functional.cross_entropy(gs(x[c]), y[c]))
        opt.step()
        return net.weight.detach() - before, loss

    whole, loss_whole = update(10)
    chunked, loss_chunked = update(3)
    assert whole.abs().sum() > 0
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-5)
    assert loss_chunked == pytest.approx(loss_whole, rel=1e-5)
