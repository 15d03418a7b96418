"""Federated learning across processes: Flower's simulation engine (Ray), SecAgg+, and real gRPC on loopback.

Each test starts real processes, so they are few and tiny (tiny-bert, a toy CSV, 2-3 sites, 1-2 rounds).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import OFFLINE, keel, write_toy_csv

pytestmark = pytest.mark.slow  # runs federations of `keel` processes

RECIPE = """
name: fedtiny
task: classification
model: {{name: tiny-bert, max_length: 32}}
data:
  path: {data}
  split: {{validation: 0.2, test: 0.2, seed: 0}}
train: {{batch_size: 8, lr: 3.0e-3}}
federated:
  sites: {sites}
  rounds: {rounds}
  partition: {{kind: dirichlet, alpha: 0.5}}
  server: {{address: "127.0.0.1:{port}"}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_sessions() -> set[str]:
    """Ray's session folders: each simulation starts one, and every Ray process names its own in its arguments."""
    import glob

    return {os.path.basename(p) for p in glob.glob("/tmp/ray/session_2*")}


def ray_leftovers(before: set[str]) -> list[str]:
    """Processes of Ray sessions started during a test that are still alive (a few seconds' grace to exit)."""
    new = ray_sessions() - before
    left: list[str] = []
    for _ in range(10):
        ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
        left = [line[:120] for line in ps if any(s in line for s in new)]
        if not left:
            break
        time.sleep(1)
    return left


def test_simulation_with_secagg(tmp_path):
    """`keel federate` with SecAgg+ on 3 simulated sites (Flower's simulation engine); eval and report work."""
    before = ray_sessions()
    data = write_toy_csv(tmp_path / "toy.csv", n=160)
    recipe = tmp_path / "fed.yaml"
    recipe.write_text(RECIPE.format(data=data, sites=3, rounds=1, port=free_port()))
    first = keel("federate", str(recipe), "federated.secagg.enabled=true", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "fedtiny"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    assert records[1]["completed"] == 3 and not records[1].get("skipped")
    info = json.loads((run / "train.json").read_text())
    assert info["secagg"] and info["rounds_done"] == 1 and info["rounds_skipped"] == 0
    assert (run / "federated" / "round-00001" / "weights.safetensors").is_file()

    ev = keel("eval", str(run), "--json", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert 0.0 <= json.loads(ev.stdout)["accuracy"] <= 1.0
    assert "Federated rounds" in (run / "report.html").read_text()
    assert not ray_leftovers(before)


class FixedSite:
    """A site that always sends the same arrays, to check what the server computes from them."""

    def __init__(self, pid: int):
        self.pid = pid

    def arrays(self):
        rng = np.random.default_rng(self.pid)
        return [rng.uniform(-1, 1, size=(3, 4)).astype(np.float32), rng.uniform(-1, 1, size=7).astype(np.float32)]

    def weight(self) -> int:
        return [5, 20, 40][self.pid]


def _secagg_client_fn(context):
    from flwr.client import NumPyClient

    site = FixedSite(int(context.node_config["partition-id"]))

    class Fixed(NumPyClient):
        def fit(self, parameters, config):
            return site.arrays(), site.weight(), {"site": f"site-{site.pid}"}

    return Fixed().to_client()


def test_secagg_aggregate_equals_the_plain_weighted_sum():
    """SecAgg+ (masked, quantized) gives the server the same aggregate as plain FedAvg of the same updates."""
    from flwr.client import ClientApp
    from flwr.client.mod import secaggplus_mod
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.simulation import run_simulation

    from keel.federated.guard import Guard, build_strategy
    from keel.recipe import FederatedConfig

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # as keel federate sets it
    before = ray_sessions()
    fed = FederatedConfig(
        sites=3, rounds=1, min_fit_clients=3, min_available_clients=3, min_completion=1.0, secagg={"enabled": True}
    )
    sites = [FixedSite(i) for i in range(3)]
    start = [np.zeros_like(a) for a in sites[0].arrays()]
    seen = {}

    def on_round(r, arrays, info):
        seen[r] = (arrays, info)
        return 0.0, {}

    guard = Guard(build_strategy(fed, start, None), fed, fit_config={}, on_round=on_round)
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        ctx = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=guard)
        DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(num_shares=3, reconstruction_threshold=2))(grid, ctx)

    run_simulation(
        server_app=server_app,
        client_app=ClientApp(client_fn=_secagg_client_fn, mods=[secaggplus_mod]),
        num_supernodes=3,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False},
        },
    )
    got, info = seen[1]
    total = sum(s.weight() for s in sites)
    # Each site sends round(x * w / max_weight) on a grid of 2 * 8 / 2^22 (stochastic rounding: at most one step
    # off); the server divides the sum by total / max_weight. So the error is at most n steps * max_weight / total.
    bound = len(sites) * (2 * 8.0 / 4194304) * 1000.0 / total
    for layer in range(2):
        plain = sum(s.weight() * s.arrays()[layer].astype(np.float64) for s in sites) / total
        np.testing.assert_allclose(got[layer], plain, rtol=0, atol=bound * 1.01)
        assert not np.allclose(got[layer], np.mean([s.arrays()[layer] for s in sites], axis=0), atol=1e-3)
    assert info["completed"] == 3
    assert not ray_leftovers(before)


def write_certificates(folder) -> dict[str, str]:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject, issuer, key, signer, ca: bool):
        b = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
        return b.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keel test CA")])
    ca = cert(ca_name, ca_name, ca_key, ca_key, ca=True)
    server = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), ca_name, key, ca_key, ca=False)
    files = {
        "root_certificate": ca.public_bytes(serialization.Encoding.PEM),
        "certificate": server.public_bytes(serialization.Encoding.PEM),
        "private_key": key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    }
    for name, pem in files.items():
        (folder / f"{name}.pem").write_bytes(pem)
    return {name: str(folder / f"{name}.pem") for name in files}


def test_two_sites_over_loopback_grpc_with_tls(tmp_path):
    """`keel federate serve` and two `keel federate join` processes, each site with its own file, over TLS."""
    data = write_toy_csv(tmp_path / "toy.csv", n=160)
    lines = data.read_text().splitlines()
    (tmp_path / "north.csv").write_text("\n".join([lines[0], *lines[1:61]]) + "\n")
    (tmp_path / "south.csv").write_text("\n".join([lines[0], *lines[61:121]]) + "\n")
    port = free_port()
    recipe = tmp_path / "fed.yaml"
    pems = write_certificates(tmp_path)
    recipe.write_text(
        RECIPE.format(data=data, sites=2, rounds=2, port=port).replace(
            f'server: {{address: "127.0.0.1:{port}"}}',
            f'server: {{address: "127.0.0.1:{port}", root_certificate: {pems["root_certificate"]}, '
            f"certificate: {pems['certificate']}, private_key: {pems['private_key']}}}",
        )
    )
    env = {**os.environ, **OFFLINE}
    cmd = [sys.executable, "-m", "keel", "federate"]
    server = subprocess.Popen(
        [*cmd, "serve", str(recipe)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    sites = []
    try:
        for name in ("north", "south"):
            sites.append(
                subprocess.Popen(
                    [*cmd, "join", str(recipe), "--site-data", f"{name}.csv", "--server", f"127.0.0.1:{port}"],
                    cwd=tmp_path,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        out, err = server.communicate(timeout=420)
        assert server.returncode == 0, err[-3000:]
        assert f"serving on 127.0.0.1:{port} (TLS)" in err
        for p, name in zip(sites, ("north", "south")):
            _, site_err = p.communicate(timeout=60)
            assert p.returncode == 0, site_err[-2000:]
            assert f"joining 127.0.0.1:{port} (TLS)" in site_err
            assert f"site {name}: 60 rows from {name}.csv" in site_err
            assert f"site {name}: done after 2 rounds" in site_err
    finally:
        for p in [server, *sites]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=20)
    run = tmp_path / "runs" / "fedtiny"
    info = json.loads((run / "train.json").read_text())
    assert info["rounds_done"] == 2 and info["sites"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["completed"] == 2 and r["rejected"] == [] for r in records[1:])
    assert "accuracy" in json.loads((run / "eval" / "test.json").read_text())


def test_join_reports_a_missing_file_and_serve_refuses_secagg(tmp_path):
    recipe = tmp_path / "fed.yaml"
    recipe.write_text(RECIPE.format(data=write_toy_csv(tmp_path / "toy.csv"), sites=2, rounds=1, port=free_port()))
    r = keel("federate", "join", str(recipe), "--site-data", "nope.csv", "--server", "127.0.0.1:1", cwd=tmp_path)
    assert r.returncode == 2 and "--site-data: file 'nope.csv' not found" in r.stderr and "Traceback" not in r.stderr
    r = keel("federate", "serve", str(recipe), "federated.secagg.enabled=true", cwd=tmp_path)
    assert r.returncode == 2 and "secagg" in r.stderr and "Traceback" not in r.stderr
    r = keel(
        "federate", str(recipe), "federated.partition.kind=column", "federated.partition.column=region", cwd=tmp_path
    )
    assert r.returncode == 2 and "federated.partition.column: column 'region' is not in" in r.stderr
    assert not (tmp_path / "runs").exists()  # nothing was started


DP_RECIPE = (
    RECIPE
    + """  local_optimizer: sgd
  local_lr: 0.5
  local_steps: 2
  min_completion: 1.0
  dp: {{mode: {mode}, clipping_norm: 0.05, {budget}}}
"""
)


def _weights(run, r: int) -> np.ndarray:
    from safetensors.numpy import load_file

    w = load_file(str(run / "federated" / f"round-{r:05d}" / "weights.safetensors"))
    return np.concatenate([w[k].ravel().astype(np.float64) for k in sorted(w)])


@pytest.mark.parametrize("mode", ["central", "local"])
def test_dp_noise_reaches_the_aggregate_and_sites_clip(tmp_path, mode):
    """`keel federate` under DP: the aggregate moves from the last global model by the planned noise, the updates
    that reach the server are clipped to dp.clipping_norm, and the epsilon spent is the accountant's.

    Local steps at lr 0.5 move every site far beyond the clipping norm 0.05, so a clipped mean moves the ~10^5
    weights by at most 0.05 in L2 norm: next to noise of std ~0.03 per weight it is invisible (< 1e-4 relative),
    while without the noise the spread would be ~1e-4, and without the clipping the server rejects every site.
    """
    from keel.federated import privacy
    from keel.recipe import load_recipe

    data = write_toy_csv(tmp_path / "toy.csv", n=120)
    recipe = tmp_path / "fed.yaml"
    budget = "noise_multiplier: 1.0" if mode == "central" else "epsilon: 8.0"
    recipe.write_text(DP_RECIPE.format(data=data, sites=2, rounds=1, port=free_port(), mode=mode, budget=budget))
    r = keel("federate", str(recipe), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "fedtiny"
    fed = load_recipe(recipe).federated
    plan = privacy.plan(fed, 2)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["completed"] == 2 and records[1]["rejected"] == [] and not records[1].get("skipped")
    assert "train_loss" not in records[1]
    moved = _weights(run, 1) - _weights(run, 0)
    if mode == "central":
        assert 0.05 * 0.999 < records[1]["max_update_norm"] <= 0.05 * (1 + 1e-3)  # what reached the server
        planned = plan["noise_std"]  # z * C / m = 1 * 0.05 / 2
        assert planned == pytest.approx(0.025)
    else:
        planned = plan["noise_std"] / np.sqrt(2)  # the mean of two sites' own noise
        assert plan["noise_std"] == pytest.approx(plan["noise_multiplier"] * 2 * 0.05)
    assert moved.size > 50_000
    assert np.std(moved) == pytest.approx(planned, rel=0.02)
    assert abs(np.mean(moved)) < 5 * planned / np.sqrt(moved.size)
    p = json.loads((run / "train.json").read_text())["privacy"]
    assert p["mode"] == mode and p["rounds_with_noise"] == 1
    assert p["epsilon_spent"] == pytest.approx(
        privacy.epsilon_spent(plan["noise_multiplier"], plan["sample_rate"], 1, plan["delta"])
    )
    assert records[1]["epsilon"] == pytest.approx(p["epsilon_spent"])
    if mode == "local":
        assert p["epsilon_spent"] <= 8.0 * (1 + 1e-6)
    # the report (and a model card) show client-level DP, not the DP-SGD section that reads other fields
    from keel.trust.card import privacy_lines

    page = (run / "report.html").read_text()
    assert "Federated rounds" in page and "<h2>Privacy" not in page
    assert f"{mode} client-level differential privacy" in privacy_lines(p)[0]
