"""`keel serve --ray`: serve.ray becomes Ray Serve's deployment options, replicas report keel's readiness as their
health, and a replica killed under load is replaced while only the requests in flight at the kill can fail."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from types import SimpleNamespace

import pytest

from keel.errors import KeelError
from keel.recipe import ServeConfig, validate_serve


def test_equal_min_and_max_replicas_is_a_fixed_count_else_autoscaling_on_ongoing_requests():
    from keel.serve.ray_serve import deployment_options

    fixed = deployment_options(validate_serve({"ray": {"min_replicas": 2, "max_replicas": 2}}))
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    config = validate_serve(
        {"drain_timeout": 12, "ray": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}}
    )
    scaled = deployment_options(config)
    assert "num_replicas" not in scaled
    auto = scaled["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"]) == (1, 4, 8)
    assert scaled["graceful_shutdown_timeout_s"] == 12  # SIGTERM drains a replica as it drains `keel serve`
    assert scaled["max_ongoing_requests"] == ServeConfig().ray.max_ongoing_requests


def test_min_over_max_replicas_is_refused_naming_both_fields():
    with pytest.raises(KeelError) as e:
        validate_serve({"ray": {"min_replicas": 3, "max_replicas": 2}})
    assert "serve.ray.min_replicas (3)" in str(e.value) and "max_replicas" in str(e.value)


def test_a_replica_is_healthy_only_while_keel_says_ready():
    from keel.serve.ray_serve import replica_health

    running = SimpleNamespace(_task=SimpleNamespace(done=lambda: False))
    state = SimpleNamespace(ready=True, draining=False, batchers={"embeddings": running})
    assert replica_health(state) is None
    state.ready = False
    assert "not ready" in replica_health(state)
    state.ready, state.batchers["classify"] = True, SimpleNamespace(_task=SimpleNamespace(done=lambda: True))
    assert "classify batcher stopped" in replica_health(state)
    state.draining = True  # on its way out already: no second replacement
    assert replica_health(state) is None


def test_tls_is_refused_with_ray_saying_where_tls_goes():
    from keel.cli.deploy import serve_on_ray

    with pytest.raises(KeelError, match="does not terminate TLS"):
        serve_on_ray("tiny-bert", ServeConfig(), None, False, "cert.pem", None)


def _serve_args(args: list[str]):
    """`keel serve ARGS` parsed and run by its click command (not the root callback, which sets up logging)."""
    import typer

    from keel.cli import app

    return typer.main.get_command(app).commands["serve"].main(args, prog_name="keel serve", standalone_mode=False)


def test_ray_address_reaches_ray_as_given_else_from_ray_address_else_a_local_cluster(monkeypatch):
    import keel.serve.ray_serve as ray_serve

    seen = []
    monkeypatch.setattr(ray_serve, "serve_ray", lambda *args: seen.append(args[-1]))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for address in ("10.0.0.5:6379", "ray://head.example:10001", "[::1]:6379", "auto", "local"):
        _serve_args(["tiny-bert", "--ray", "--ray-address", address])
    _serve_args(["tiny-bert", "--ray"])
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    _serve_args(["tiny-bert", "--ray"])
    _serve_args(["tiny-bert", "--ray", "--ray-address", "other:6380"])  # the option wins over the environment
    assert seen == [
        "10.0.0.5:6379",
        "ray://head.example:10001",
        "[::1]:6379",
        "auto",
        "local",
        "local",
        "head:6379",
        "other:6380",
    ]


@pytest.mark.parametrize(
    "address", ["head", "head:", "head:port", "head:0", "head:70000", "http://head:6379", "::1:6379", "a b:1"]
)
def test_a_malformed_ray_address_is_refused_in_one_line_naming_where_it_came_from(monkeypatch, address):
    import keel.serve.ray_serve as ray_serve

    monkeypatch.setattr(ray_serve, "serve_ray", lambda *args: pytest.fail("a malformed address reached Ray"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(KeelError) as e:
        _serve_args(["tiny-bert", "--ray", "--ray-address", address])
    assert str(e.value).startswith("--ray-address must be HOST:PORT") and repr(address) in str(e.value)
    assert "\n" not in str(e.value)
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(KeelError, match="^RAY_ADDRESS must be HOST:PORT"):
        _serve_args(["tiny-bert", "--ray"])


def test_ray_address_without_ray_is_refused_saying_add_ray(monkeypatch):
    import keel.serve.server as server

    monkeypatch.setattr(server, "serve", lambda *args: pytest.fail("served without Ray"))
    with pytest.raises(KeelError, match="--ray-address is for keel serve --ray; add --ray"):
        _serve_args(["tiny-bert", "--ray-address", "head:6379"])


# -- a real local Ray cluster ------------------------------------------------------------------------------------


def _replicas(pid: int) -> list[int]:
    """PIDs of the keel replicas among the processes of the `keel serve --ray` started as ``pid``."""
    import psutil

    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "ServeReplica:keel" in " ".join(child.cmdline()):
                found.append(child.pid)
        except psutil.Error:
            pass
    return found


async def _load(url: str, stop: asyncio.Event, concurrency: int, log: list) -> None:
    """``concurrency`` clients, each sending its next embeddings request when the last is answered; every request
    is logged as (start, end, status or the exception's name)."""
    import httpx

    async def client(i: int):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            n = 0
            while not stop.is_set():
                start = time.monotonic()
                try:
                    r = await http.post("/v1/embeddings", json={"input": f"request {i}-{n} about a car"})
                    outcome = r.status_code
                except httpx.HTTPError as e:
                    outcome = type(e).__name__
                log.append((start, time.monotonic(), outcome))
                n += 1

    await asyncio.gather(*(client(i) for i in range(concurrency)))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_replica_killed_under_load_is_replaced_and_only_its_requests_in_flight_fail():
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed")
    pytest.importorskip("psutil", reason="psutil (a Ray dependency) is not installed")
    from serve_helpers import Server

    try:
        server = Server(
            "tiny-bert",
            "--ray",
            "--set", "serve.ray.min_replicas=2",
            "--set", "serve.ray.max_replicas=2",
            "--set", "serve.ray.num_cpus=0.5",
            "--set", "serve.ray.health_check_period_s=1",
            "--set", "serve.num_threads=1",
            "--set", "serve.drain_timeout=2",
        )  # fmt: skip
    except AssertionError as e:
        if "could not start or join a local Ray cluster" in str(e):
            pytest.skip("Ray could not start a local cluster here")
        raise
    try:
        before = _replicas(server.proc.pid)
        assert len(before) == 2, server.log[-3000:]
        log: list = []

        async def scenario() -> dict:
            stop = asyncio.Event()
            load = asyncio.create_task(_load(server.url, stop, 16, log))
            await asyncio.sleep(3)
            killed_at = time.monotonic()
            os.kill(before[0], signal.SIGKILL)
            replaced_at = None
            while time.monotonic() - killed_at < 180:
                now = _replicas(server.proc.pid)
                if len(now) == 2 and before[0] not in now:
                    replaced_at = time.monotonic()
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(8)  # Ray routes to the new replica once it has loaded and warmed up
            stop.set()
            await load
            return {"killed_at": killed_at, "replaced_at": replaced_at}

        run = asyncio.run(scenario())
        assert run["replaced_at"] is not None, "Ray did not replace the killed replica:\n" + server.log[-3000:]
        killed_at = run["killed_at"]
        in_flight = sum(1 for s, e, _ in log if s <= killed_at < e)  # on both replicas: an upper bound for the one
        failed = [(round(s - killed_at, 2), round(e - killed_at, 2), o) for s, e, o in log if o != 200]
        print(f"requests {len(log)}, in flight at the kill {in_flight}, failed {len(failed)}: {failed[:8]}")
        assert len(failed) <= in_flight, failed
        assert all(s <= 0 for s, _, _ in failed), failed  # every failure was sent before the kill
        ok_after = [o for s, e, o in log if s > run["replaced_at"]]
        assert ok_after and set(ok_after) == {200}
        served_while_down = [o for s, e, o in log if run["killed_at"] < s and e < run["replaced_at"]]
        assert 200 in served_while_down  # the other replica kept answering
        assert httpx_ready(server.url)
    finally:
        server.stop()


def httpx_ready(url: str) -> bool:
    import httpx

    return httpx.get(f"{url}/health/ready", timeout=10).status_code == 200
