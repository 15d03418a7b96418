"""`keel federate serve` / `join` hardened: bounded waits, named failed sites, refused strangers, safe binds.

The end-to-end test runs real processes on loopback (tiny-bert, toy CSVs); the rest stops before a model loads.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import OFFLINE, keel, write_toy_csv
from test_federated_e2e import RECIPE, free_port, write_certificates

pytestmark = pytest.mark.slow  # runs `keel federate` servers and sites

SECRET = "test-federation-secret-0123456789"


def _recipe(tmp_path, *, sites=2, rounds=1, port=None, extra="") -> tuple:
    port = port or free_port()
    data = write_toy_csv(tmp_path / "toy.csv", n=160)
    text = RECIPE.format(data=data, sites=sites, rounds=rounds, port=port) + extra
    (tmp_path / "fed.yaml").write_text(text)
    return tmp_path / "fed.yaml", port, data


def test_serve_refuses_an_exposed_address_and_weak_secrets(tmp_path):
    """A non-loopback bind needs TLS and a site secret (or an explicit flag); nothing is started when refused."""
    recipe, port, _ = _recipe(tmp_path)
    no_secret = {"KEEL_FEDERATION_SECRET": ""}
    r = keel("federate", "serve", str(recipe), "--address", f"0.0.0.0:{port}", cwd=tmp_path, timeout=120, env=no_secret)
    assert r.returncode == 2 and "refusing to serve the federation on 0.0.0.0 without TLS" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr

    pems = write_certificates(tmp_path)
    tls = [f"federated.server.{k}={v}" for k, v in pems.items()]
    r = keel(
        "federate", "serve", str(recipe), *tls, "--address", f"0.0.0.0:{port}", cwd=tmp_path, timeout=120, env=no_secret
    )
    assert r.returncode == 2 and "without a site secret" in r.stderr and "--allow-no-auth" in r.stderr, r.stderr[-2000:]

    r = keel("federate", "serve", str(recipe), cwd=tmp_path, timeout=120, env={"KEEL_FEDERATION_SECRET": "short"})
    assert r.returncode == 2 and "fewer than 16" in r.stderr and "short" not in r.stderr  # never echoed
    (tmp_path / "empty.txt").write_text("\n")
    r = keel("federate", "serve", str(recipe), "--secret-file", "empty.txt", cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "--secret-file empty.txt is empty" in r.stderr
    assert not (tmp_path / "runs").exists()

    # a site does not send the secret, nor its updates, in clear text to another machine
    r = keel(
        "federate",
        "join",
        str(recipe),
        "--site-data",
        "toy.csv",
        "--server",
        "10.1.2.3:9092",
        cwd=tmp_path,
        timeout=120,
        env={"KEEL_FEDERATION_SECRET": SECRET},
    )
    assert r.returncode == 2 and "refusing to send the federation secret to 10.1.2.3 in clear text" in r.stderr


def test_join_checks_its_file_before_connecting(tmp_path):
    """A malformed site file stops the site at once, in one line (exit 2): it never connects, so it cannot stall."""
    recipe, port, _ = _recipe(tmp_path, extra="")
    recipe.write_text(recipe.read_text().replace(f'"127.0.0.1:{port}"}}', f'"127.0.0.1:{port}", round_timeout: 5}}'))
    (tmp_path / "broken.csv").write_text("body;stars\nnice ride;pos\n")
    t0 = time.monotonic()
    r = keel(
        "federate",
        "join",
        str(recipe),
        "--site-data",
        "broken.csv",
        "--server",
        f"127.0.0.1:{port}",
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--site-data: column 'text' is not in broken.csv" in r.stderr and "set data.columns.text" in r.stderr
    assert "joining" not in r.stderr and "no server answered" not in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 100


def test_site_manager_bounds_the_wait_and_names_the_sites_that_left():
    """Flower's manager waits a day for min_available_clients; keel's waits round_timeout, then says who left."""
    from flwr.server.client_proxy import ClientProxy

    from keel.federated.transport import SiteManager, TooFewSites

    class Proxy(ClientProxy):
        def get_properties(self, *a, **k): ...
        def get_parameters(self, *a, **k): ...
        def fit(self, *a, **k): ...
        def evaluate(self, *a, **k): ...
        def reconnect(self, *a, **k): ...

    m = SiteManager(wait_s=0.5, needed=2, offset=3)
    a, b = Proxy("a1"), Proxy("b2")
    for proxy, name in ((a, "north"), (b, "south[bold]")):
        m.local.site = name
        assert m.register(proxy)
    assert len(m.sample(2, 2)) == 2  # round 4: both there
    m.unregister(b)
    t0 = time.monotonic()
    with pytest.raises(TooFewSites) as e:
        m.sample(2, 2)
    assert time.monotonic() - t0 < 5
    assert "round 5 needs 2 sites" in str(e.value) and "south[bold] (round 4)" in str(e.value)
    assert "federated.server.round_timeout" in str(e.value) and "--resume" in str(e.value)
    assert "south" not in e.value.for_sites and "join again when the server resumes" in e.value.for_sites


def _popen(args, cwd, env):
    return subprocess.Popen(
        [sys.executable, "-m", "keel", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_a_failed_site_ends_the_run_with_its_name_and_strangers_are_refused(tmp_path):
    """Real serve + 3 sites (one with a label the server lacks) + a stranger without the secret, on loopback.

    The bad site fails at round 1 in one line; round 2 needs 3 sites and only 2 remain: after round_timeout the
    server ends the run naming the site, tells the healthy sites why, and every process exits within bounds.
    """
    recipe, port, data = _recipe(tmp_path, sites=3, rounds=2)
    text = recipe.read_text().replace(f'"127.0.0.1:{port}"}}', f'"127.0.0.1:{port}", round_timeout: 60}}')
    recipe.write_text(text + "  min_available_clients: 3\n  min_fit_clients: 3\n")
    lines = data.read_text().splitlines()
    (tmp_path / "north.csv").write_text("\n".join([lines[0], *lines[1:41]]) + "\n")
    (tmp_path / "south.csv").write_text("\n".join([lines[0], *lines[41:81]]) + "\n")
    (tmp_path / "odd.csv").write_text("\n".join([lines[0], *(x.replace(",neg", ",meh") for x in lines[81:101])]) + "\n")
    env = {**os.environ, **OFFLINE, "KEEL_FEDERATION_SECRET": SECRET}
    join = ["federate", "join", str(recipe), "train.num_threads=1", "--server", f"127.0.0.1:{port}", "--site-data"]
    server = _popen(["federate", "serve", str(recipe)], tmp_path, env)
    procs = [server]
    try:
        stranger = _popen(
            [*join, "north.csv", "--site-name", "stranger"], tmp_path, {**env, "KEEL_FEDERATION_SECRET": ""}
        )
        procs.append(stranger)
        _, stranger_err = stranger.communicate(timeout=240)
        assert stranger.returncode == 2 and "site stranger: the server" in stranger_err, stranger_err[-2000:]
        assert "refused this site (no or wrong federation secret" in stranger_err
        sites = {n: _popen([*join, f"{n}.csv"], tmp_path, env) for n in ("north", "south", "odd")}
        procs += list(sites.values())
        _, err = server.communicate(timeout=420)
        assert server.returncode == 2, err[-3000:]
        assert "refused a site from" in err and "site stranger joined" not in err
        assert "site odd left during round 1" in err
        end = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(end) == 1 and "round 2 needs 3 sites" in end[0] and "odd (round 1)" in end[0], err[-3000:]
        assert "Traceback" not in err
        outs = {n: p.communicate(timeout=120)[1] for n, p in sites.items()}
        assert sites["odd"].returncode == 2 and "site odd: --site-data: label 'meh' in odd.csv" in outs["odd"]
        assert "Traceback" not in outs["odd"]
        for n in ("north", "south"):
            assert sites[n].returncode == 2, outs[n][-2000:]
            told = [line for line in outs[n].splitlines() if line.startswith("error:")]
            assert (
                len(told) == 1
                and f"site {n}: the server ended the run after this site trained 1 rounds: round 2 needs 3 sites"
                in told[0]
                and "odd" not in told[0]
            ), outs[n][-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=20)
    rounds = sorted(p.name for p in (tmp_path / "runs" / "fedtiny" / "federated").glob("round-*"))
    assert rounds[-1] == "round-00001"  # the completed round is saved for --resume


def test_sigterm_marks_the_run_failed_and_resumable(tmp_path):
    """Flower's signal handler is gone with start_server: keel's own turns SIGTERM into a marked, resumable stop."""
    import json

    recipe, port, _ = _recipe(tmp_path)
    server = _popen(["federate", "serve", str(recipe)], tmp_path, {**os.environ, **OFFLINE})
    try:
        deadline = time.monotonic() + 240
        lines = []
        while time.monotonic() < deadline:
            line = server.stderr.readline()
            lines.append(line)
            if "round 0 (initial model)" in line or not line:
                break
        assert any("round 0" in x for x in lines), "".join(lines)[-2000:]
        time.sleep(1)
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)
    assert server.returncode == 130 and "interrupted" in err, err[-2000:]
    info = json.loads((tmp_path / "runs" / "fedtiny" / "run.json").read_text())
    assert info["status"] == "failed"
