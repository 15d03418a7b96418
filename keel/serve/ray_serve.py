"""`keel serve TARGET --ray`: keel's app (the same routes, guard, batching) as a Ray Serve deployment.

Each replica builds the app from TARGET itself (so TARGET must be at the same path on every node), runs its
lifespan (load, warm up) and reports healthy only while keel's readiness says so; Ray's proxy spreads requests
over the replicas and the autoscaler adds or removes replicas on ongoing requests (``serve.ray``). A replica that
dies or fails its health check is replaced by Ray; the requests it was answering fail, the others do not.
--ray-address (default $RAY_ADDRESS) picks an existing cluster; without it a local one is started and stopped
with the process.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading

from keel.errors import KeelError
from keel.progress import console, esc, out

logger = logging.getLogger(__name__)

APP_NAME = "keel"
DEPLOYMENT = "KeelReplica"


def deployment_options(config) -> dict:
    """``serve.ray`` (and the drain timeout) as Ray Serve's deployment options: a fixed replica count when
    min_replicas == max_replicas, else autoscaling on ongoing requests."""
    ray_cfg = config.ray
    options = {
        "name": DEPLOYMENT,
        "max_ongoing_requests": ray_cfg.max_ongoing_requests,
        "health_check_period_s": ray_cfg.health_check_period_s,
        "health_check_timeout_s": ray_cfg.health_check_timeout_s,
        "graceful_shutdown_timeout_s": config.drain_timeout,
        "ray_actor_options": {"num_cpus": ray_cfg.num_cpus, "num_gpus": ray_cfg.num_gpus},
    }
    if ray_cfg.min_replicas == ray_cfg.max_replicas:
        options["num_replicas"] = ray_cfg.min_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": ray_cfg.min_replicas,
            "max_replicas": ray_cfg.max_replicas,
            "initial_replicas": ray_cfg.min_replicas,
            "target_ongoing_requests": ray_cfg.target_ongoing_requests,
            "upscale_delay_s": ray_cfg.upscale_delay_s,
            "downscale_delay_s": ray_cfg.downscale_delay_s,
        }
    return options


class _Ingress:
    """keel's guarded app as Ray Serve's replica expects an ASGI app: Starlette's ``add_exception_handler`` (Ray
    maps its back-pressure errors to 503 through it) reaches the FastAPI app inside the guard."""

    def __init__(self, guard):
        self.guard, self.state = guard, guard.state

    def add_exception_handler(self, exc, handler) -> None:
        self.guard.app.add_exception_handler(exc, handler)

    async def __call__(self, scope, receive, send) -> None:
        await self.guard(scope, receive, send)


def replica_health(state) -> str | None:
    """Why a replica should be replaced, or None: keel's readiness (what /health/ready answers from) and its
    batchers' tasks. A draining replica is healthy: it is already on its way out."""
    if state.draining:
        return None
    if not state.ready:
        return "keel replica is not ready (the model is not loaded and warmed up)"
    stopped = sorted(name for name, b in state.batchers.items() if b._task is None or b._task.done())
    if stopped:
        return f"keel replica's {', '.join(stopped)} batcher stopped; Ray replaces the replica"
    return None


def build_application(target: str, config, key_digests: list[bytes], device: str | None = None):
    """The Ray Serve application: one deployment whose replicas each serve keel's app for ``target``.

    Only the SHA-256 digests of the API keys travel to the replicas, never the keys."""
    from ray import serve

    def build_asgi():  # runs in each replica
        import torch

        from keel.serve.app import build_app
        from keel.serve.engines import load_engine
        from keel.serve.server import _quiet_logs

        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        _quiet_logs(config.log_text)
        engine = load_engine(target, config.backend, dev)
        engine.forward_batch_size = config.forward_batch_size or (8 if engine.device == "cpu" else None)
        return _Ingress(build_app(engine, config, key_digests))

    @serve.ingress(build_asgi)
    class KeelReplica:
        def check_health(self):
            """Ray replaces a replica whose check raises."""
            problem = replica_health(self.app.state)
            if problem:
                raise RuntimeError(problem)

    return serve.deployment(KeelReplica, **deployment_options(config)).bind()


def _model_routes(target: str) -> tuple[str, tuple[str, ...]]:
    """The model id and routes the replicas will serve, for the printed examples, without loading the model."""
    import json
    from pathlib import Path

    keel_json = Path(target) / "model" / "keel.json"
    if keel_json.is_file():
        task = json.loads(keel_json.read_text()).get("task")
        return Path(target).name, ("chat",) if task == "causal-lm" else ("classify",)
    from keel.models.registry import resolve_model

    name, spec = resolve_model(target)
    return (spec.name if spec else Path(target).name), ("chat",) if spec and spec.kind == "causal-lm" else ("classify",)


ADDRESS_FORMS = "HOST:PORT (a Ray head, e.g. 10.0.0.5:6379), ray://HOST:PORT (Ray Client), auto or local"


def ray_address(value: str | None) -> str:
    """The Ray cluster `keel serve --ray` joins: ``value`` (--ray-address), else $RAY_ADDRESS, else "local" (a new
    cluster on this machine, even when `ray start` left one running: "auto" joins that). Raises KeelError, naming
    where the address came from, when it is malformed."""
    import os

    source = "--ray-address"
    if value is None:
        value, source = os.environ.get("RAY_ADDRESS") or "local", "RAY_ADDRESS"
    if value in ("auto", "local"):
        return value
    host, _, port = value.removeprefix("ray://").rpartition(":")
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # an IPv6 host: [::1]:6379
    odd = any(c.isspace() or c in "/?#@[]" or (c == ":" and name == host) for c in name)
    if not name or odd or not (port.isdigit() and 0 < int(port) < 65536):
        raise KeelError(f"{source} must be {ADDRESS_FORMS}; got {value!r}")
    return value


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def serve_ray(
    target: str,
    config,
    key_file: str | None = None,
    allow_no_auth: bool = False,
    device: str | None = None,
    address: str = "local",
) -> None:
    """Start a Ray cluster (``address`` "local") or join one (see `ray_address`), deploy keel's app on it and block
    until SIGTERM/Ctrl-C."""
    from pathlib import Path

    from keel.serve.engines import check_target
    from keel.serve.guard import load_key_digests
    from keel.serve.server import check_bind, docs_note, keys_note, usage_lines

    check_target(target)
    if Path(target).exists():  # replicas do not start in this working directory
        target = str(Path(target).resolve())
    digests = load_key_digests(key_file)
    check_bind(config.host, bool(digests), allow_no_auth)
    try:
        import ray
        from ray import serve
    except ImportError:
        raise KeelError("keel serve --ray needs Ray Serve; pip install 'ray[serve]' (see requirements.txt)") from None
    port = config.port or free_port(config.host)
    joins = address != "local"
    console.print(
        f"[dim]{'joining the Ray cluster at ' + esc(address) if joins else 'starting a local Ray cluster'}[/]"
    )
    # The replicas import keel from the same place as this process, on this node and on others.
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, TimeoutError, ValueError) as e:
        where = f"the Ray cluster at {address}" if joins else "a local Ray cluster"
        raise KeelError(f"could not start or join {where} ({type(e).__name__}: {e}); check `ray status`") from None
    stop = threading.Event()
    try:
        serve.start(http_options={"host": config.host, "port": port})
        replicas = config.ray.min_replicas
        console.print(f"[dim]deploying {esc(target)} on {replicas} replica(s); each loads and warms up the model[/]")
        try:
            serve.run(build_application(target, config, digests, device), name=APP_NAME, route_prefix="/")
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise KeelError(
                f"Ray Serve could not start the replicas ({first}); their traceback is in the log above"
            ) from None
        shown = f"[{config.host}]" if ":" in config.host else config.host
        url = f"http://{'127.0.0.1' if config.host in ('0.0.0.0', '::') else shown}:{port}"
        ray_cfg = config.ray
        scaling = (
            f"{ray_cfg.min_replicas} replica(s)"
            if ray_cfg.min_replicas == ray_cfg.max_replicas
            else f"{ray_cfg.min_replicas}-{ray_cfg.max_replicas} replicas, "
            f"target {ray_cfg.target_ongoing_requests:g} ongoing requests each"
        )
        out.print(
            f"serving [bold]{esc(target)}[/] on Ray Serve ({scaling}) at [bold]{url}[/]  "
            f"docs: {url}/docs{docs_note(bool(digests), config.public_docs)}  keys: {keys_note(config.host, bool(digests))}"
        )
        model_id, routes = _model_routes(target)
        for line in usage_lines(url, model_id, routes, bool(digests), key_file):
            out.print(line, markup=False, highlight=False)
        out.file.flush()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        console.print("[dim]stopping: replicas drain (serve.drain_timeout), then Ray Serve shuts down[/]")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
