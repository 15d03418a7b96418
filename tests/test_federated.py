"""Federated learning glue, in one process (no Ray, no network): aggregation, validation, drop-outs, partitions, DP.

The multi-process paths (Flower's simulation engine, SecAgg+, gRPC between processes) are in
test_federated_e2e.py.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from keel.errors import DataError, KeelError
from keel.recipe import load_recipe

FED_RECIPE = """
name: fed
task: classification
model: {{name: tiny-bert, max_length: 32}}
data:
  path: {data}
  split: {{validation: 0.2, test: 0.2, seed: 0}}
train: {{batch_size: 8, lr: 0.05, max_grad_norm: null, eval_batch_size: 64}}
federated:
  sites: {sites}
  rounds: 2
  min_fit_clients: 2
  min_available_clients: 2
  local_optimizer: sgd
  partition: {{kind: iid, seed: 0}}
"""


class Proxy:
    """Stands in for Flower's ClientProxy: the aggregation code only reads its cid."""

    def __init__(self, cid: str):
        self.cid = cid


def fit_res(arrays, n: int, site: str):
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    return Proxy(site), FitRes(
        status=Status(Code.OK, ""),
        parameters=ndarrays_to_parameters(arrays),
        num_examples=n,
        metrics={"site": site, "loss": 1.0},
    )


def make_guard(reference, sampled: int, **fed_overrides):
    from keel.federated.guard import Guard, build_strategy
    from keel.recipe import FederatedConfig

    fed = FederatedConfig(**fed_overrides)
    guard = Guard(build_strategy(fed, reference, None), fed, fit_config={}, on_round=lambda *a: (0.0, {}))
    guard._reference, guard._sampled = reference, sampled
    return guard


def arrays_of(params):
    from flwr.common import parameters_to_ndarrays

    return parameters_to_ndarrays(params)


def test_fedavg_equals_sample_weighted_mean():
    rng = np.random.default_rng(0)
    reference = [np.zeros((4, 3)), np.zeros(5)]
    clients = [[rng.normal(size=(4, 3)), rng.normal(size=5)] for _ in range(3)]
    sizes = [10, 30, 61]
    guard = make_guard(reference, sampled=3)
    params, _ = guard.aggregate_fit(1, [fit_res(c, n, f"s{i}") for i, (c, n) in enumerate(zip(clients, sizes))], [])
    got = arrays_of(params)
    for layer in range(2):
        expected = sum(n * c[layer] for c, n in zip(clients, sizes)) / sum(sizes)
        np.testing.assert_allclose(got[layer], expected, rtol=0, atol=1e-7)
    # and it is not the plain (unweighted) mean, so the test can tell the two apart
    assert not np.allclose(got[0], np.mean([c[0] for c in clients], axis=0), atol=1e-3)


def test_malformed_updates_are_rejected_and_the_site_named(capsys):
    ref = [np.zeros((2, 2), np.float32), np.zeros(3, np.float32)]
    good_a = [np.ones((2, 2), np.float32), np.ones(3, np.float32)]
    good_b = [3 * np.ones((2, 2), np.float32), 3 * np.ones(3, np.float32)]
    bad = {
        "wrong-shape": [np.ones((2, 3), np.float32), np.ones(3, np.float32)],
        "wrong-dtype": [np.ones((2, 2), np.float64), np.ones(3, np.float32)],
        "not-finite": [np.full((2, 2), np.nan, np.float32), np.ones(3, np.float32)],
        "too-many-arrays": [*good_a, np.ones(1, np.float32)],
        "too-large": [100 * np.ones((2, 2), np.float32), np.ones(3, np.float32)],
    }
    guard = make_guard(ref, sampled=7, max_update_norm=50.0, min_completion=0.2)
    results = [fit_res(good_a, 1, "good-a"), fit_res(good_b, 1, "good-b")] + [
        fit_res(a, 1000, s) for s, a in bad.items()
    ]
    params, _ = guard.aggregate_fit(1, results, [])
    got = arrays_of(params)
    np.testing.assert_allclose(got[0], 2 * np.ones((2, 2)))  # the mean of the two good ones only
    err = capsys.readouterr().err
    for site in bad:
        assert f"rejected the update of site {site}" in err
    assert "good-a" not in err and "good-b" not in err
    assert "shape (2, 3)" in err and "dtype float64" in err and "non-finite" in err and "max_update_norm" in err
    assert guard._round_info["rejected"] == list(bad)


def test_round_survives_dropouts_above_the_minimum_completion(capsys):
    ref = [np.zeros(3, np.float32)]
    a, b = [np.ones(3, np.float32)], [3 * np.ones(3, np.float32)]
    guard = make_guard(ref, sampled=4, min_completion=0.5)
    params, _ = guard.aggregate_fit(1, [fit_res(a, 1, "a"), fit_res(b, 1, "b")], [TimeoutError("c"), TimeoutError("d")])
    np.testing.assert_allclose(arrays_of(params)[0], 2 * np.ones(3))
    assert "skipped" not in guard._round_info

    guard = make_guard(ref, sampled=4, min_completion=0.75)  # 2 of 4 is below 75%: the round is skipped
    params, _ = guard.aggregate_fit(2, [fit_res(a, 1, "a"), fit_res(b, 1, "b")], [TimeoutError("c"), TimeoutError("d")])
    assert params is None
    assert "2 usable updates of 4 sampled, 3 needed" in guard._round_info["skipped"]
    assert "skipped" in capsys.readouterr().err


def _tiny_setup(tmp_path, toy_csv, sites=3):
    from keel.federated.common import setup

    p = tmp_path / "fed.yaml"
    p.write_text(FED_RECIPE.format(data=toy_csv, sites=sites))
    return setup(load_recipe(p))


@pytest.mark.slow
def test_one_local_step_with_full_participation_equals_centralized_sgd(tmp_path, toy_csv):
    import torch

    from keel.federated.common import build_model, site_partitions
    from keel.federated.site import get_weights, local_train
    from keel.tasks.classification import collate

    s = _tiny_setup(tmp_path, toy_csv)
    train = s.data.splits["train"]
    base = build_model(s, s.data.labels).double()
    for m in base.modules():  # dropout off: one step must be a deterministic function of the data
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    start = get_weights(base)
    lr = 0.5
    parts = site_partitions(s)
    guard = make_guard(start, sampled=len(parts))
    results = []
    for i, rows in enumerate(parts):
        site_model = copy.deepcopy(base)
        stats = local_train(
            site_model,
            train.select(rows),
            s.tokenizer,
            epochs=1,
            batch_size=len(rows),
            lr=lr,
            optimizer="sgd",
            max_grad_norm=None,
        )
        assert stats["steps"] == 1
        results.append(fit_res(get_weights(site_model), len(rows), f"site-{i}"))
    fed = arrays_of(guard.aggregate_fit(1, results, [])[0])

    central = copy.deepcopy(base)
    central.train()
    loss = central(**collate(train[list(range(len(train)))], s.tokenizer)).loss  # mean over all rows
    loss.backward()
    with torch.no_grad():
        for p in central.parameters():
            p -= lr * p.grad
    moved = 0.0
    for f, c, s0 in zip(fed, get_weights(central), start):
        np.testing.assert_allclose(f, c, rtol=0, atol=1e-9)
        moved = max(moved, float(np.abs(c - s0).max()))
    assert moved > 1e-4  # the step really changed the weights


def test_partitions_cover_every_row_once_and_skew_with_alpha():
    from keel.federated.partition import partition

    labels = np.repeat(np.arange(3), 200)
    skews = {}
    for kind, alpha in (("iid", 0.5), ("dirichlet", 100.0), ("dirichlet", 0.1)):
        parts = partition(labels, 10, kind, alpha, seed=1)
        flat = sorted(i for p in parts for i in p)
        assert flat == list(range(len(labels))) and all(parts)
        assert parts == partition(labels, 10, kind, alpha, seed=1)  # deterministic
        # mean total-variation distance between a site's label mix and the global one
        skews[(kind, alpha)] = np.mean(
            [0.5 * np.abs(np.bincount(labels[p], minlength=3) / len(p) - 1 / 3).sum() for p in parts]
        )
    assert skews[("dirichlet", 0.1)] > 3 * skews[("iid", 0.5)]
    assert skews[("dirichlet", 0.1)] > skews[("dirichlet", 100.0)]

    groups = ["north"] * 3 + ["south"] * 2
    assert partition([0, 1, 0, 1, 0], 2, "column", groups=groups) == [[0, 1, 2], [3, 4]]
    with pytest.raises(DataError, match="federated.sites=2"):
        partition([0, 1, 0, 1, 0], 3, "column", groups=groups)
    with pytest.raises(DataError, match="cannot make"):
        partition([0, 1], 5)


@pytest.mark.slow
def test_dp_noise_spends_the_budget_and_rounds_stop_there():
    from keel.federated import privacy
    from keel.recipe import FederatedConfig

    fed = FederatedConfig(sites=10, rounds=5, fraction_fit=0.5, dp={"mode": "central", "epsilon": 8.0})
    p = privacy.plan(fed, 5)
    assert p["delta"] == pytest.approx(0.01) and p["sample_rate"] == 0.5 and p["sampling"] == "poisson"
    assert p["noise_std"] == pytest.approx(p["noise_multiplier"] * 1.0 / 5)  # z * C / m
    eps = privacy.spent(p, 5)
    assert 7.5 < eps <= 8.0
    assert privacy.spent(p, 2) < privacy.spent(p, 3) < eps
    assert privacy.round_allowed(p, 4) and not privacy.round_allowed(p, 5)
    # less noise spends more: the budget then stops the run before its planned rounds
    p_small = {**p, "noise_multiplier": p["noise_multiplier"] * 0.8}
    allowed = sum(privacy.round_allowed(p_small, r) for r in range(5))
    assert 0 < allowed < 5
    # Opacus's own figure for the same (z, q, steps, delta): the accountant is Opacus's, not a copy
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for _ in range(5):
        acc.step(noise_multiplier=p["noise_multiplier"], sample_rate=0.5)
    assert eps == pytest.approx(acc.get_epsilon(0.01), rel=1e-9)


def _gdp_delta(eps: float, mu: float) -> float:
    """The exact (eps, delta) profile of a mu-GDP mechanism, e.g. R Gaussian releases of std sigma and sensitivity
    s compose to mu = sqrt(R) * s / sigma (Balle & Wang 2018, Thm. 8; Dong, Roth & Su 2019, Cor. 2.13)."""
    import math

    from scipy.stats import norm

    return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2))


def test_local_dp_noise_meets_its_budget_exactly_where_the_classic_bound_did_not():
    import math

    from keel.federated import privacy
    from keel.recipe import FederatedConfig

    for eps, rounds in ((8.0, 4), (0.5, 4), (30.0, 2)):  # 2 per round (the README's), below 1, and far above
        fed = FederatedConfig(sites=10, rounds=rounds, dp={"mode": "local", "epsilon": eps, "clipping_norm": 0.5})
        p = privacy.plan(fed, 10)
        assert p["sensitivity"] == 1.0 and p["noise_std"] == pytest.approx(p["noise_multiplier"] * 1.0)
        assert 0.95 * eps < privacy.spent(p, rounds) <= eps * (1 + 1e-6)
        # the oracle: the exact privacy profile of `rounds` Gaussian releases; RDP is an upper bound on it
        exact = _gdp_delta(eps, math.sqrt(rounds) * p["sensitivity"] / p["noise_std"])
        assert exact <= p["delta"]
    # The old per-site noise, sqrt(2 ln(1.25 / delta_r)) * C / eps_r per round, is not (eps, delta)-DP for one site's
    # data at the README's 2 per round: two of a site's datasets give clipped updates 2C apart.
    eps_r, delta_r = 2.0, 0.01 / 4
    old_std = math.sqrt(2 * math.log(1.25 / delta_r)) * 0.5 / eps_r
    assert _gdp_delta(eps_r, 1.0 / old_std) > 10 * delta_r


def test_local_dp_site_adds_its_own_noise_and_the_server_refuses_a_site_without_it(capsys):
    from keel.federated import privacy
    from keel.federated.guard import Guard, build_strategy
    from keel.federated.site import privatize
    from keel.recipe import FederatedConfig

    fed = FederatedConfig(
        sites=4, rounds=2, min_completion=0.2, dp={"mode": "local", "epsilon": 4.0, "clipping_norm": 1.0}
    )
    local = privacy.local_noise(fed)
    start = [np.zeros(20000, np.float32)]
    sent = privatize(
        [np.full(20000, 10.0, np.float32)], start, {"clipping_norm": 100.0}, local
    )  # its own C, not the server's
    assert np.std(sent[0]) == pytest.approx(local["noise_std"], rel=0.03)
    assert np.mean(sent[0]) == pytest.approx(1.0 / np.sqrt(20000), abs=4 * local["noise_std"] / np.sqrt(20000))

    p = privacy.plan(fed, 4)
    guard = Guard(build_strategy(fed, start, p), fed, fit_config={}, on_round=lambda *a: (0.0, {}), dp_plan=p)
    guard._reference, guard._sampled = start, 3
    honest = fit_res(sent, 1, "honest")
    honest[1].metrics = {"site": "honest", "dp_noise_std": local["noise_std"], "loss": 1.0}
    weak = fit_res(sent, 1, "weak")
    weak[1].metrics = {"site": "weak", "dp_noise_std": local["noise_std"] / 2}
    params, _ = guard.aggregate_fit(1, [honest, weak, fit_res(sent, 1, "silent")], [])
    assert params is not None and guard._round_info["rejected"] == ["weak", "silent"]
    assert "reports local DP noise std" in capsys.readouterr().err
    assert "train_loss" not in guard._round_info  # the sites' losses are not released under DP

    # a site's spend counts when it is asked (the round may still be skipped), and the budget check sees it
    from flwr.common import ndarrays_to_parameters

    guard.dp_rounds = 0
    guard.configure_fit(1, ndarrays_to_parameters(start), Sampler(4))
    guard.aggregate_fit(1, [], [TimeoutError("all gone")])
    assert guard.dp_rounds == 1 and "skipped" in guard._round_info
    assert guard.configure_fit(2, ndarrays_to_parameters(start), Sampler(4))  # round 2 of 2: within the budget
    assert guard.configure_fit(3, ndarrays_to_parameters(start), Sampler(4)) == []  # a third would spend more


def test_local_dp_site_sends_no_more_noised_updates_than_its_budget(monkeypatch):
    import torch

    from keel.federated import privacy, site
    from keel.recipe import FederatedConfig

    monkeypatch.setattr(site, "local_train", lambda *a, **k: {"loss": 0.5, "steps": 3})
    local = privacy.local_noise(FederatedConfig(sites=4, rounds=2, dp={"mode": "local", "epsilon": 4.0}))
    model = torch.nn.Linear(3, 2)
    client = site.make_client(
        "north",
        lambda labels: (model, None, list(range(7))),
        {
            "batch_size": 2,
            "lr": 0.1,
            "optimizer": "sgd",
            "max_grad_norm": None,
            "seed": 0,
            "local_epochs": 1,
            "local_dp": local,
        },
    )
    start = site.get_weights(model)
    for _ in range(2):
        arrays, n, metrics = client.fit(start, {})
        assert n == 1 and metrics == {"site": "north", "dp_noise_std": local["noise_std"]}  # no rows, loss or steps
    with pytest.raises(KeelError, match="local DP budget spent"):
        client.fit(start, {})


def _central(sites=3, **dp):
    from keel.federated import privacy
    from keel.federated.guard import Guard, build_strategy, sites_per_round
    from keel.recipe import FederatedConfig

    strategy = dp.pop("strategy", "fedavg")
    fed = FederatedConfig(
        sites=sites,
        rounds=3,
        min_fit_clients=2,
        min_available_clients=2,
        min_completion=0.5,
        strategy={"name": strategy},
        dp={"mode": "central", **dp},
    )
    p = privacy.plan(fed, sites_per_round(fed))
    seen = {}

    def on_round(r, arrays, info):
        seen[r] = (arrays, info)
        return 0.0, {}

    ref = [np.zeros((30, 40), np.float32), np.zeros(50, np.float32)]
    guard = Guard(build_strategy(fed, ref, p), fed, fit_config={}, on_round=on_round, dp_plan=p)
    guard._reference, guard._sampled = ref, sites
    return guard, p, ref, seen


def test_central_dp_round_with_a_dropout_completes_and_spends_epsilon_once(capsys):
    from flwr.common import ndarrays_to_parameters

    from keel.federated import privacy

    guard, p, ref, seen = _central(sites=3, noise_multiplier=1e-4, clipping_norm=1.0)
    rng = np.random.default_rng(0)
    ups = [[rng.normal(size=a.shape).astype(np.float32) for a in ref] for _ in range(2)]
    ups = [
        [(a * (0.5 / np.sqrt(sum(float((b**2).sum()) for b in u)))).astype(np.float32) for a in u] for u in ups
    ]  # norm 0.5
    unclipped = [3 * a for a in ups[0]]
    results = [fit_res(ups[0], 1, "a"), fit_res(ups[1], 1, "b"), fit_res(unclipped, 1, "greedy")]
    params, _ = guard.aggregate_fit(1, results, [TimeoutError("site c dropped out")])
    assert params is not None, "a drop-out under central DP must not cost the round"
    got = arrays_of(params)
    for layer in range(2):  # the fixed denominator: m = 3 planned sites, the drop-out and the rejected one add 0
        np.testing.assert_allclose(got[layer], (ups[0][layer] + ups[1][layer]) / 3, atol=5e-4)
    assert guard._round_info["rejected"] == ["greedy"] and guard._round_info["failed"] == 1
    assert "did not clip" in capsys.readouterr().err
    assert guard._round_info["max_update_norm"] == pytest.approx(1.5, rel=1e-5)
    guard.evaluate(1, ndarrays_to_parameters(got))
    assert guard.dp_rounds == 1 and seen[1][1]["epsilon"] == pytest.approx(privacy.spent(p, 1))
    assert seen[1][1]["dp_rounds"] == 1

    # below min_completion the round is skipped and nothing is spent
    guard._sampled = 3
    params, _ = guard.aggregate_fit(2, [fit_res(ups[0], 1, "a")], [TimeoutError("b"), TimeoutError("c")])
    assert params is None and guard.dp_rounds == 1


def test_central_dp_under_secagg_sums_the_surviving_sites_with_the_fixed_denominator():
    guard, p, ref, _ = _central(sites=4, noise_multiplier=1e-5, clipping_norm=1.0)
    guard.fed = guard.fed.model_copy(update={"secagg": guard.fed.secagg.model_copy(update={"enabled": True})})
    mean = [np.full(a.shape, 0.01, np.float32) for a in ref]  # what SecAgg+ unmasks: the mean of 3 surviving sites
    params, _ = guard.aggregate_fit(1, [fit_res(mean, 1, f"s{i}") for i in range(3)], [TimeoutError("dropped")])
    for got in arrays_of(params):  # sum = 3 * mean, over m = 4 planned sites
        np.testing.assert_allclose(got, 0.0075, atol=1e-4)
    big = [np.full(a.shape, 1.0, np.float32) for a in ref]  # a mean of norm > C: some site did not clip
    params, _ = guard.aggregate_fit(2, [fit_res(big, 1, f"s{i}") for i in range(4)], [])
    assert params is None and len(guard._round_info["rejected"]) == 4


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_central_dp_noise_has_the_planned_std_and_comes_before_the_server_optimizer(strategy):
    guard, p, ref, _ = _central(sites=2, noise_multiplier=2.0, clipping_norm=1.0, strategy=strategy)
    zero = [a.copy() for a in ref]
    params, _ = guard.aggregate_fit(1, [fit_res(zero, 1, "a"), fit_res(zero, 1, "b")], [])
    moved = np.concatenate([a.ravel() for a in arrays_of(params)])
    if strategy == "fedavg":  # z * C / m on every coordinate: 2 * 1 / 2
        assert p["noise_std"] == 1.0 and np.std(moved) == pytest.approx(1.0, rel=0.05)
    else:  # FedAdam's first step is about server_lr * sign(noised mean): the noise went in before it
        assert 0.5 * guard.fed.strategy.server_lr < np.max(np.abs(moved)) <= 1.01 * guard.fed.strategy.server_lr


def test_central_dp_samples_each_site_independently():
    from keel.federated import privacy
    from keel.federated.guard import Guard, build_strategy, sites_per_round
    from keel.recipe import FederatedConfig

    class Manager(Sampler):
        def all(self):
            return {str(i): Proxy(str(i)) for i in range(self.n)}

    fed = FederatedConfig(sites=400, rounds=3, fraction_fit=0.25, dp={"mode": "central", "noise_multiplier": 1.0})
    p = privacy.plan(fed, sites_per_round(fed))
    ref = [np.zeros(3, np.float32)]
    guard = Guard(
        build_strategy(fed, ref, p), fed, fit_config={"clipping_norm": 1.0}, on_round=lambda *a: (0.0, {}), dp_plan=p
    )
    from flwr.common import ndarrays_to_parameters

    counts = [len(guard.configure_fit(r, ndarrays_to_parameters(ref), Manager(400))) for r in range(1, 7)]
    assert len(set(counts)) > 1, "a fixed number of sites per round is not the Poisson sampling RDP accounts for"
    assert all(100 - 4 * 8.7 < c < 100 + 4 * 8.7 for c in counts)  # Binomial(400, 0.25): mean 100, std 8.7
    ins = guard.configure_fit(7, ndarrays_to_parameters(ref), Manager(400))
    assert all(i.config["clipping_norm"] == 1.0 for _, i in ins)


@pytest.mark.slow
def test_central_dp_refuses_strategies_it_cannot_account_for(tmp_path, toy_csv):
    from conftest import keel

    recipe = tmp_path / "fed.yaml"
    recipe.write_text(FED_RECIPE.format(data=toy_csv, sites=4))
    central = ["federated.dp.mode=central", "federated.dp.epsilon=8"]
    for name in ("krum", "trimmed-mean"):
        r = keel("validate", str(recipe), *central, f"federated.strategy.name={name}", cwd=tmp_path)
        assert r.returncode == 2 and f"strategy.name={name} with dp.mode=central" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    r = keel(
        "validate",
        str(recipe),
        "federated.dp.mode=local",
        "federated.dp.epsilon=8",
        "federated.strategy.name=krum",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr  # local DP: the server's rule is post-processing of noised updates
    for bad, why in (
        ("federated.dp.delta=0.3", "not below 1/sites"),
        ("federated.dp.noise_multiplier=0", "adds no noise"),
    ):
        r = keel("validate", str(recipe), "federated.dp.mode=central", "federated.dp.epsilon=8", bad, cwd=tmp_path)
        assert r.returncode == 2 and why in r.stderr, r.stderr


def test_validate_of_a_federated_dp_recipe_imports_no_torch(tmp_path, toy_csv):
    import subprocess
    import sys

    recipe = tmp_path / "fed.yaml"
    recipe.write_text(FED_RECIPE.format(data=toy_csv, sites=4))
    code = (
        "import sys\nfrom keel.cli import app\n"
        f"try:\n    app(['validate', {str(recipe)!r}, 'federated.dp.mode=central', 'federated.dp.epsilon=8', "
        "'federated.strategy.name=fedadam'])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'opacus', 'flwr', 'transformers')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_round_checkpoints_resume_and_refuse_another_model(tmp_path):
    from keel.errors import CheckpointError
    from keel.federated.rounds import load_round, save_round

    specs = [("a", (2,), "float32"), ("b", (1, 3), "float32")]
    assert load_round(tmp_path, specs) is None
    for r in range(4):
        save_round(
            tmp_path, r, specs, [np.full(2, r, np.float32), np.full((1, 3), r, np.float32)], {"dp_rounds": r}, keep=2
        )
    assert sorted(p.name for p in tmp_path.glob("round-*")) == ["round-00002", "round-00003"]
    arrays, state = load_round(tmp_path, specs)
    assert state["round"] == 3 and state["dp_rounds"] == 3 and arrays[1][0, 2] == 3
    with pytest.raises(CheckpointError, match="shape"):
        load_round(tmp_path, [("a", (2,), "float32"), ("b", (3,), "float32")])
    with open(tmp_path / "round-00003" / "weights.safetensors", "r+b") as f:  # a flipped byte is caught
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(CheckpointError, match="checksum"):
        load_round(tmp_path, specs)


def test_recipe_section_is_checked():
    from keel.errors import RecipeError
    from keel.recipe import validate_recipe

    base = {"data": {"name": "tweets-sentiment"}}
    with pytest.raises(RecipeError, match="did you mean 'federated.rounds'"):
        validate_recipe({**base, "federated": {"roundz": 3}})
    with pytest.raises(RecipeError, match="partition.column"):
        validate_recipe({**base, "federated": {"partition": {"kind": "column"}}})
    with pytest.raises(RecipeError, match="dp.epsilon"):
        validate_recipe({**base, "federated": {"dp": {"mode": "central"}}})
    with pytest.raises(RecipeError, match="dp.delta=0.2 is not below 1/sites"):
        validate_recipe({**base, "federated": {"sites": 10, "dp": {"mode": "central", "epsilon": 8.0, "delta": 0.2}}})
    assert load_recipe("federated").federated.sites == 10


class Sampler:
    """Stands in for Flower's ClientManager: every site is available."""

    def __init__(self, n: int):
        self.n = n

    def num_available(self) -> int:
        return self.n

    def sample(self, num_clients, min_num_clients=None, criterion=None):
        return [Proxy(str(i)) for i in range(num_clients)]


def drive(c, clients, crash_after: int | None = None) -> None:
    """What Flower's server loop does with a strategy, in one process: init, then fit/aggregate/evaluate per round."""
    from flwr.common import parameters_to_ndarrays

    guard = c.strategy()
    params = guard.initialize_parameters(None)
    guard.evaluate(0, params)
    for rnd in range(1, c.remaining + 1):
        results = []
        for proxy, ins in guard.configure_fit(rnd, params, Sampler(len(clients))):
            arrays, n, metrics = clients[int(proxy.cid)].fit(parameters_to_ndarrays(ins.parameters), ins.config)
            results.append(fit_res(arrays, n, metrics["site"]))
        new, _ = guard.aggregate_fit(rnd, results, [])
        params = new or params
        guard.evaluate(rnd, params)
        if crash_after == rnd + c.offset:
            raise KeyboardInterrupt("server killed")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_server_restart_resumes_after_the_last_completed_round(tmp_path, toy_csv, monkeypatch, strategy):
    from keel.federated import common
    from keel.federated import run as fed_run
    from keel.federated.site import make_client

    monkeypatch.chdir(tmp_path)
    p = tmp_path / "fed.yaml"
    p.write_text(FED_RECIPE.format(data=toy_csv, sites=2))
    recipe = load_recipe(p, [f"federated.strategy.name={strategy}"])

    def body_for(crash_after):
        def body(s, c):
            parts = common.site_partitions(s)
            rows = [s.data.splits["train"].select(r) for r in parts]
            clients = [
                make_client(
                    f"site-{i}",
                    lambda labels, i=i: (common.build_model(s, labels), s.tokenizer, rows[i]),
                    common.site_settings(recipe),
                )
                for i in range(len(parts))
            ]
            drive(c, clients, crash_after)

        return body

    from keel.pipeline import federate

    def run_with(body, resume, r=recipe):  # `keel federate` with these rounds in place of Flower's simulation
        monkeypatch.setattr(fed_run, "_simulation", lambda recipe, **options: body)
        return federate(r, "simulate", resume=resume)

    with pytest.raises(KeyboardInterrupt):
        run_with(body_for(crash_after=1), False)
    run = tmp_path / "runs" / "fed"
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    assert not (run / "model").exists()
    kept = load_round_state(run)
    assert kept["round"] == 1

    run_with(body_for(crash_after=None), True)  # the restarted server
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    info = json.loads((run / "train.json").read_text())
    assert info["rounds_done"] == 2 and info["rounds_skipped"] == 0
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert (run / "eval" / "test.json").is_file() and "Federated rounds" in (run / "report.html").read_text()
    # The restarted run ends with the model an uninterrupted run gets (for FedAdam: its server moments survived).
    from safetensors.numpy import load_file

    moments = sorted((run / "federated").glob("round-*"))[-1] / "server_moments.safetensors"
    assert moments.is_file() == (strategy == "fedadam")
    straight = load_recipe(p, [f"federated.strategy.name={strategy}", "output.dir=runs/straight"])
    run_with(body_for(crash_after=None), False, straight)
    resumed, uninterrupted = (
        load_file(str(tmp_path / "runs" / d / "model" / "model.safetensors")) for d in ("fed", "straight")
    )
    assert sorted(resumed) == sorted(uninterrupted)
    for k in resumed:
        np.testing.assert_allclose(resumed[k], uninterrupted[k], atol=1e-6)


def load_round_state(run) -> dict:
    last = sorted((run / "federated").glob("round-*"))[-1]
    return json.loads((last / "state.json").read_text())
