"""`keel ui [RUNS_DIR]`: a local web console over a folder of runs (keel/ui)."""

from __future__ import annotations

import typer

from keel.cli._app import app
from keel.errors import KeelError
from keel.progress import esc, out


def _serve_key(key_file: str | None) -> str | None:
    """The key /api/chat sends to keel serve: the first key line of ``key_file``, else the first of $KEEL_API_KEYS."""
    import os
    from pathlib import Path

    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise KeelError(f"--serve-key-file {key_file} not found; pass a file with the key on its first line")
        keys = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        keys = [k for k in keys if not k.startswith("#")]
        if not keys:
            raise KeelError(f"--serve-key-file {key_file} holds no key; write the key on a line of its own")
        return keys[0]
    keys = [k.strip() for k in os.environ.get("KEEL_API_KEYS", "").split(",") if k.strip()]
    return keys[0] if keys else None


def check_serve_url(url: str | None) -> str | None:
    from urllib.parse import urlsplit

    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/") or parts.query:
        raise KeelError(
            f"--serve-url must be the address keel serve printed, such as http://127.0.0.1:8000; got {url!r}"
        )
    return url.rstrip("/")


@app.command()
def ui(
    runs_dir: str = typer.Argument("runs", help="the folder holding run directories (default: runs)"),
    host: str = typer.Option("127.0.0.1", help="bind address (a non-loopback one needs API keys)"),
    port: int = typer.Option(8100, help="port (0 = any free port)"),
    serve_url: str | None = typer.Option(
        "http://127.0.0.1:8000", "--serve-url", help="the keel serve the chat page talks to"
    ),
    serve_key_file: str | None = typer.Option(
        None, help="file whose first line is keel serve's key (default: the first key in $KEEL_API_KEYS)"
    ),
    api_key_file: str | None = typer.Option(None, help="file with one console key per line (or set KEEL_API_KEYS)"),
    allow_no_auth: bool = typer.Option(False, "--allow-no-auth", help="serve a non-loopback address without keys"),
) -> None:
    """Browse runs in a local web page: status and figures, a run's report and curves, runs compared, chat."""
    from pathlib import Path

    import uvicorn

    from keel.serve.guard import load_key_digests
    from keel.serve.server import bind_socket, check_bind, keys_note
    from keel.ui.app import build_app
    from keel.ui.runs import list_runs

    root = Path(runs_dir)
    if not root.is_dir():
        raise KeelError(
            f"runs folder '{runs_dir}' not found; pass the folder that holds your runs (make demo writes runs/)"
        )
    if not 0 <= port <= 65535:
        raise KeelError(f"--port must be 0..65535; got {port}")
    url_of_serve = check_serve_url(serve_url)
    digests = load_key_digests(api_key_file)
    check_bind(host, bool(digests), allow_no_auth)
    serve_key = _serve_key(serve_key_file)
    sock = bind_socket(host, port)
    bound, bound_port = sock.getsockname()[:2]
    shown = f"[{bound}]" if ":" in bound else bound
    url = f"http://{'127.0.0.1' if bound in ('0.0.0.0', '::') else shown}:{bound_port}"
    count = len(list_runs(root))
    out.print(
        f"keel ui: {count} run(s) in {esc(root)} at [bold]{url}[/]  keys: {keys_note(bound, bool(digests))}  "
        f"chat: {esc(url_of_serve or 'off')}",
        soft_wrap=True,
    )
    out.print("open it in a browser on this machine; Ctrl-C stops it", markup=False)
    out.file.flush()
    asgi = build_app(root, digests, url_of_serve, serve_key)
    config = uvicorn.Config(asgi, log_level="warning", access_log=False, server_header=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
