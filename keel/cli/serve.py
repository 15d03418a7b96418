"""`keel serve`: a model behind the OpenAI-compatible HTTP API."""

from __future__ import annotations

import typer

from keel.cli._app import app
from keel.errors import KeelError


@app.command()
def serve(
    target: str = typer.Argument(..., help="a run directory, or a model name (keel ls) or local model folder"),
    recipe: str | None = typer.Option(
        None, "--recipe", help="take the serve: section from this recipe (default: the run directory's recipe.yaml)"
    ),
    overrides: list[str] | None = typer.Option(
        None, "--set", help="serve.key=value, e.g. --set serve.max_batch_size=64"
    ),
    host: str | None = typer.Option(None, help="bind address (serve.host; default 127.0.0.1)"),
    port: int | None = typer.Option(None, help="port (serve.port; default 8000; 0 = any free port)"),
    engine: str | None = typer.Option(
        None, help="generation engine: torch (keel's own) or llama.cpp (the run's GGUF export) (serve.engine)"
    ),
    backend: str | None = typer.Option(
        None, help="auto (the deployable variant, else onnx-int8, onnx, torch) or a variant name (serve.backend)"
    ),
    api_key_file: str | None = typer.Option(None, help="file with one API key per line (or set KEEL_API_KEYS)"),
    allow_no_auth: bool = typer.Option(False, "--allow-no-auth", help="serve a non-loopback address without keys"),
    ssl_certfile: str | None = typer.Option(None, help="TLS certificate (PEM)"),
    ssl_keyfile: str | None = typer.Option(None, help="TLS private key (PEM)"),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when available)"),
    ray: bool = typer.Option(False, "--ray", help="serve on Ray Serve: replicas and autoscaling from serve.ray"),
    ray_address: str | None = typer.Option(
        None,
        "--ray-address",
        metavar="ADDRESS",
        help="with --ray: the cluster to join, HOST:PORT, ray://HOST:PORT, auto or local "
        "(default $RAY_ADDRESS, else a new local cluster)",
    ),
    learn: bool = typer.Option(
        False,
        "--learn",
        help="run `keel learn` rounds in the background on the run's schedule (learn.every, learn.min_feedback) "
        "and swap in what they promote",
    ),
    learn_every: str | None = typer.Option(
        None, "--learn-every", help="with --learn: how often to check for new feedback (90s, 30m, 2h; learn.every)"
    ),
) -> None:
    """Serve a model behind an OpenAI-compatible HTTP API (classify, embeddings, completions, chat)."""
    from keel.serve.server import serve as _serve
    from keel.serve.server import serve_config

    if ray_address is not None and not ray:
        raise KeelError("--ray-address is for keel serve --ray; add --ray, or drop --ray-address")
    config = serve_config(target, recipe, overrides, host=host, port=port, backend=backend, engine=engine)
    if learn_every is not None and not learn:
        raise KeelError("--learn-every sets the schedule of --learn; pass --learn too")
    background = []
    if learn:
        if ray:
            raise KeelError("--learn runs beside one server; serve without --ray (Ray replicas do not swap versions)")
        from keel.learn.schedule import check_serving, run_schedule, schedule_for

        check_serving(config)
        schedule = schedule_for(target, learn_every)
        background.append(lambda: run_schedule(schedule))
    if ray:
        from keel.cli.deploy import serve_on_ray

        return serve_on_ray(target, config, api_key_file, allow_no_auth, ssl_certfile, device, ray_address)
    _serve(target, config, api_key_file, allow_no_auth, ssl_certfile, ssl_keyfile, device, background=background)
