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

    return Proxy(site), FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(arrays),
                               num_examples=n, metrics={"site": site, "loss": 1.0})


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
    results = [fit_res(good_a, 1, "good-a"), fit_res(good_b, 1, "good-b")] + [fit_res(a, 1000, s) for s, a in bad.items()]
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
    from keel.federated.run import setup

    p = tmp_path / "fed.yaml"
    p.write_text(FED_RECIPE.format(data=toy_csv, sites=sites))
    return setup(load_recipe(p))


def test_one_local_step_with_full_participation_equals_centralized_sgd(tmp_path, toy_csv):
    import torch

    from keel.federated.run import build_model, site_partitions
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
        stats = local_train(site_model, train.select(rows), s.tokenizer, epochs=1, batch_size=len(rows), lr=lr,
                            optimizer="sgd", max_grad_norm=None)
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
        skews[(kind, alpha)] = np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=3) / len(p) - 1 / 3).sum() for p in parts])
    assert skews[("dirichlet", 0.1)] > 3 * skews[("iid", 0.5)]
    assert skews[("dirichlet", 0.1)] > skews[("dirichlet", 100.0)]

    groups = ["north"] * 3 + ["south"] * 2
    assert partition([0, 1, 0, 1, 0], 2, "column", groups=groups) == [[0, 1, 2], [3, 4]]
    with pytest.raises(DataError, match="federated.sites=2"):
        partition([0, 1, 0, 1, 0], 3, "column", groups=groups)
    with pytest.raises(DataError, match="cannot make"):
        partition([0, 1], 5)


def test_dp_noise_spends_the_budget_and_rounds_stop_there():
    from keel.federated import privacy
    from keel.recipe import FederatedConfig

    fed = FederatedConfig(sites=10, rounds=5, fraction_fit=0.5, dp={"mode": "central", "epsilon": 8.0})
    p = privacy.plan(fed, 5)
    assert p["delta"] == pytest.approx(0.01) and p["sample_rate"] == 0.5
    eps = privacy.spent(p, 5)
    assert 7.5 < eps <= 8.0
    assert privacy.spent(p, 2) < privacy.spent(p, 3) < eps
    assert privacy.round_allowed(p, 4) and not privacy.round_allowed(p, 5)
    # less noise spends more: the budget then stops the run before its planned rounds
    p_small = {**p, "noise_multiplier": p["noise_multiplier"] * 0.8}
    allowed = sum(privacy.round_allowed(p_small, r) for r in range(5))
    assert 0 < allowed < 5
    with pytest.raises(KeelError, match="delta"):
        privacy.plan(FederatedConfig(sites=10, dp={"mode": "central", "epsilon": 8.0, "delta": 0.2}), 5)
    local = privacy.plan(FederatedConfig(sites=10, rounds=4, dp={"mode": "local", "epsilon": 8.0}), 10)
    assert local["round_epsilon"] == 2.0 and privacy.spent(local, 4) == 8.0


def test_site_clips_its_update_for_central_dp():
    from keel.federated.site import privatize

    start = [np.zeros(4, np.float32)]
    new = [np.array([3.0, 4.0, 0.0, 0.0], np.float32)]  # norm 5
    clipped = privatize([a.copy() for a in new], start, {"clipping_norm": 1.0})
    assert np.linalg.norm(clipped[0]) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(privatize([a.copy() for a in new], start, {}), new)


def test_round_checkpoints_resume_and_refuse_another_model(tmp_path):
    from keel.errors import CheckpointError
    from keel.federated.run import load_round, save_round

    specs = [("a", (2,), "float32"), ("b", (1, 3), "float32")]
    assert load_round(tmp_path, specs) is None
    for r in range(4):
        save_round(tmp_path, r, specs, [np.full(2, r, np.float32), np.full((1, 3), r, np.float32)], {"dp_rounds": r}, keep=2)
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


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_server_restart_resumes_after_the_last_completed_round(tmp_path, toy_csv, monkeypatch, strategy):
    from keel.federated import run as fed_run
    from keel.federated.site import make_client

    monkeypatch.chdir(tmp_path)
    p = tmp_path / "fed.yaml"
    p.write_text(FED_RECIPE.format(data=toy_csv, sites=2))
    recipe = load_recipe(p, [f"federated.strategy.name={strategy}"])

    def body_for(crash_after):
        def body(s, c):
            parts = fed_run.site_partitions(s)
            rows = [s.data.splits["train"].select(r) for r in parts]
            clients = [make_client(f"site-{i}", lambda labels, i=i: (fed_run.build_model(s, labels), s.tokenizer, rows[i]),
                                   fed_run.site_settings(recipe)) for i in range(len(parts))]
            drive(c, clients, crash_after)
        return body

    with pytest.raises(KeyboardInterrupt):
        fed_run._run(recipe, False, body_for(crash_after=1))
    run = tmp_path / "runs" / "fed"
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    assert not (run / "model").exists()
    kept = load_round_state(run)
    assert kept["round"] == 1

    fed_run._run(recipe, True, body_for(crash_after=None))  # the restarted server
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
    fed_run._run(straight, False, body_for(crash_after=None))
    resumed, uninterrupted = (load_file(str(tmp_path / "runs" / d / "model" / "model.safetensors"))
                              for d in ("fed", "straight"))
    assert sorted(resumed) == sorted(uninterrupted)
    for k in resumed:
        np.testing.assert_allclose(resumed[k], uninterrupted[k], atol=1e-6)


def load_round_state(run) -> dict:
    last = sorted((run / "federated").glob("round-*"))[-1]
    return json.loads((last / "state.json").read_text())
