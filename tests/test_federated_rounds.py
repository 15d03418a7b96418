"""Federated round checkpoints: resume after the last completed round, refuse another model's checkpoints, and a
server killed mid-run that continues where it stopped (FedAvg and FedAdam, whose server moments are part of the state)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_federated import FED_RECIPE, Sampler, fit_res

from keel.recipe import load_recipe


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
