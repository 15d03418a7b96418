"""`keel serve`: load the model, check the bind and keys, print how to call it, run uvicorn until SIGTERM.

On SIGTERM (or Ctrl-C) /health/ready turns 503 at once, uvicorn stops accepting connections, the requests
already accepted finish (up to serve.drain_timeout in all), and the process exits 0. A client whose headers or
body do not arrive within serve.read_timeout_s gets 408 and its connection is closed; one that cannot be parsed
gets a 400 in the same JSON envelope as every other error.
"""

from __future__ import annotations

import logging
import socket

from keel.errors import KeelError
from keel.net import is_loopback
from keel.progress import console, out


def serve_config(target: str, recipe: str | None = None, overrides: list[str] | None = None, **options):
    """The ``serve:`` section for serving ``target`` (`keel serve`, ``Run.serve``): the one in ``recipe``, else in the
    run directory's recipe.yaml, else the defaults; then ``serve.key=value`` overrides, then ``options`` (host, port,
    backend, ...) that are not None. Raises KeelError naming the bad key or value."""
    from pathlib import Path

    from keel.recipe import apply_override, load_recipe, validate_serve

    raw_serve: dict = {}
    source = Path(recipe) if recipe else Path(target) / "recipe.yaml"
    if recipe or source.is_file():
        raw_serve = load_recipe(source).serve.model_dump()
    raw = {"serve": raw_serve}
    for item in overrides or []:
        if not item.startswith("serve."):
            raise KeelError(f"--set {item}: only serve.* keys can be set here, e.g. --set serve.max_batch_size=64")
        apply_override(raw, item)
    for key, value in options.items():
        if value is not None:
            raw["serve"][key] = value
    return validate_serve(raw["serve"])


def check_bind(host: str, has_keys: bool, allow_no_auth: bool) -> None:
    if not has_keys and not is_loopback(host) and not allow_no_auth:
        raise KeelError(
            f"refusing to serve on {host} without API keys; set KEEL_API_KEYS or --api-key-file, "
            "or pass --allow-no-auth if the network is trusted"
        )


def usage_lines(
    url: str, model_id: str, routes: tuple[str, ...], has_keys: bool, key_file: str | None = None
) -> list[str]:
    """A ready-to-paste curl and openai example for the loaded model, reading the key from where the server did:
    the first key in $KEEL_API_KEYS, else the first key line of --api-key-file."""
    import os
    import shlex

    if not has_keys:
        auth_h, key = "", '"none"'
    elif os.environ.get("KEEL_API_KEYS", "").strip() or not key_file:
        auth_h = ' -H "Authorization: Bearer ${KEEL_API_KEYS%%,*}"'
        key = 'os.environ["KEEL_API_KEYS"].split(",")[0].strip()'
    else:
        auth_h = f" -H \"Authorization: Bearer $(grep -v -m1 -e '^ *#' -e '^ *$' {shlex.quote(key_file)})\""
        key = f"next(k.strip() for k in open({key_file!r}) if k.strip() and not k.lstrip().startswith('#'))"
    if "chat" in routes:
        curl = (
            f"curl -s {url}/v1/chat/completions -H 'Content-Type: application/json'{auth_h} "
            f'-d \'{{"model": "{model_id}", "messages": [{{"role": "user", "content": "Hello!"}}], '
            f'"max_tokens": 32}}\''
        )
        call = (
            f'print(client.chat.completions.create(model="{model_id}", max_tokens=32, '
            f'messages=[{{"role": "user", "content": "Hello!"}}]).choices[0].message.content)'
        )
    elif "classify" in routes:
        curl = (
            f"curl -s {url}/v1/classify -H 'Content-Type: application/json'{auth_h} "
            f'-d \'{{"input": ["I love my new self-driving car", "the ride was awful"]}}\''
        )
        call = (
            f'print(client.post("/classify", cast_to=dict, body={{"input": ["I love my new self-driving car"]}}))'
            f'\nprint(len(client.embeddings.create(model="{model_id}", input="hello").data[0].embedding))'
        )
    else:
        curl = (
            f"curl -s {url}/v1/embeddings -H 'Content-Type: application/json'{auth_h} "
            f'-d \'{{"input": ["hello world"]}}\''
        )
        call = f'print(len(client.embeddings.create(model="{model_id}", input="hello").data[0].embedding))'
    py = (
        f"python - <<'EOF'\nimport os\nfrom openai import OpenAI\n"
        f'client = OpenAI(base_url="{url}/v1", api_key={key})\n{call}\nEOF'
    )
    return [curl, py]


def serve(
    target: str,
    config,
    key_file: str | None = None,
    allow_no_auth: bool = False,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    device: str | None = None,
    background=(),
) -> None:
    """``background``: coroutine functions the app runs while it is ready (keel/serve/app.py's build_app)."""
    import uvicorn

    from keel.serve.app import build_app
    from keel.serve.engines import check_target, load_engine
    from keel.serve.guard import load_key_digests

    check_target(target)
    _check_feedback(target, config)

    digests = load_key_digests(key_file)
    check_bind(config.host, bool(digests), allow_no_auth)
    if bool(ssl_certfile) != bool(ssl_keyfile):
        raise KeelError("TLS needs both --ssl-certfile and --ssl-keyfile")
    import torch

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    sock = bind_socket(config.host, config.port)
    if config.verify_key:  # before any weight is read: an unsigned or changed model is refused here
        from pathlib import Path

        from keel.secure.sign import SignatureError, verify_run

        if not (Path(target) / "model" / "keel.json").is_file():
            raise SignatureError(
                f"serve.verify_key is set but {target} is not a run directory keel signs; serve a "
                "signed run (keel sign RUN --key PRIVATE.pem)"
            )
        verify_run(target, config.verify_key)
        console.print(f"[dim]signatures of {target} match {config.verify_key}[/]")
    console.print(f"[dim]loading {target}[/]")
    _quiet_logs(config.log_text)  # before loading: the encoder behind embeddings skips the classifier's head
    engine = load_engine(target, config.backend, device, config.engine, config.num_threads)
    engine.forward_batch_size = config.forward_batch_size or (8 if engine.device == "cpu" else None)
    check_decode(engine, config)
    from pathlib import Path

    is_run = (Path(target) / "model" / "keel.json").is_file()
    asgi = build_app(engine, config, digests, run_dir=Path(target) if is_run else None, background=background)
    fastapi_app = asgi.app
    host, port = sock.getsockname()[:2]
    scheme = "https" if ssl_certfile else "http"
    shown = f"[{host}]" if ":" in host else host
    url = f"{scheme}://{'127.0.0.1' if host in ('0.0.0.0', '::') else shown}:{port}"
    uconfig = uvicorn.Config(
        asgi,
        log_level="info",
        access_log=config.log_text,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        timeout_graceful_shutdown=config.drain_timeout,
        lifespan="on",
        server_header=False,
        http=_protocol_class(config.read_timeout_s),
    )
    server = _DrainingServer(uconfig, fastapi_app.state.keel, config.drain_timeout)
    out.print(
        f"serving [bold]{engine.model_id}[/] ({engine.kind}, {engine.backend}) at [bold]{url}[/]  "
        f"docs: {url}/docs{docs_note(bool(digests), config.public_docs)}  keys: {keys_note(host, bool(digests))}"
    )
    for line in usage_lines(url, engine.model_id, engine.routes, bool(digests), key_file):
        out.print(line, markup=False, highlight=False)
    out.print("waiting for the model to warm up; /health/ready turns 200 when it has", markup=False)
    out.file.flush()
    server.run(sockets=[sock])


def _check_feedback(target: str, config) -> None:
    """Served texts kept as feedback would be plaintext beside a run sealed at rest: refused before loading."""
    from pathlib import Path

    from keel.secure.seal import is_sealed

    fb = config.feedback
    if fb.enabled and fb.store_text and is_sealed(Path(target) / "model"):
        raise KeelError(
            f"{target} is sealed, and serve.feedback.store_text would write served texts in plaintext beside it; "
            "set serve.feedback.store_text=false (feedback keeps their SHA-256) or unseal the run"
        )


def check_decode(engine, config) -> None:
    """serve.decode=keel on a model keel's decode step cannot run: one line, before the port is bound."""
    if config.decode != "keel" or engine.kind != "causal-lm":
        return
    if engine.scheduler_factory is not None:
        raise KeelError("serve.decode=keel is for keel's own engine; with serve.engine=llama.cpp drop serve.decode")
    from keel.serve.decode_step import decode_step_for

    decode_step_for(engine.lm, "keel")  # raises, naming why


def docs_note(has_keys: bool, public_docs: bool) -> str:
    if has_keys and not public_docs:
        return " (needs a key; serve.public_docs=true opens it to browsers)"
    return ""


def keys_note(host: str, has_keys: bool) -> str:
    if has_keys:
        return "required"
    if is_loopback(host):
        return "none (loopback only)"
    return f"none: anyone who can reach {host} can call it (--allow-no-auth)"


def _protocol_class(read_timeout_s: float):
    """uvicorn's HTTP protocol with a deadline for each request's headers, and JSON errors from the parser.

    uvicorn has no header timeout: a client that sends half a request line holds its connection forever.
    Here the headers must be complete ``read_timeout_s`` after the connection opened or the previous response
    ended (idle keep-alive connections are closed earlier by uvicorn's own keep-alive timeout).
    """
    import json

    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # httptools not installed: uvicorn's pure-Python parser
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    from keel.serve.errors import envelope

    class KeelHTTPProtocol(Base):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._keel_bytes = False  # bytes of a request whose headers are not complete yet
            self._keel_timer = self.loop.call_later(read_timeout_s, self._keel_headers_late)

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self._keel_bytes = True
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._keel_bytes = False
            self._keel_rearm()

        def connection_lost(self, exc):
            self._keel_timer.cancel()
            super().connection_lost(exc)

        def _keel_rearm(self) -> None:
            self._keel_timer.cancel()
            if not self.transport.is_closing():
                self._keel_timer = self.loop.call_later(read_timeout_s, self._keel_headers_late)

        def _keel_headers_late(self) -> None:
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:  # a request is being answered
                return self._keel_rearm()
            if self._keel_bytes:
                self._keel_send(
                    408,
                    f"the request headers did not arrive within {read_timeout_s:g} s (serve.read_timeout_s)",
                    "header_timeout",
                )
            else:
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            self._keel_send(
                400,
                "the HTTP request could not be parsed (request line, method, header or "
                "Content-Length); send a valid HTTP/1.1 request",
                "invalid_http",
            )

        def _keel_send(self, status: int, message: str, code: str) -> None:
            body = json.dumps(envelope(status, message, None, code)).encode()
            reason = {400: b"Bad Request", 408: b"Request Timeout"}[status]
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s" % (status, reason, len(body), body)
            )
            self.transport.close()

    return KeelHTTPProtocol


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (IPv6 when the host has a colon); a port in use is one clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise KeelError(f"cannot bind {host}:{port} ({e.strerror}); pick another --port (0 = any free port)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _quiet_logs(log_text: bool) -> None:
    """Request lines carry no bodies, but access logs stay off unless serve.log_text is set."""
    logging.getLogger("keel.serve").setLevel(logging.INFO)
    if not logging.getLogger("keel.serve").handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logging.getLogger("keel.serve").addHandler(handler)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def _make_server_class():
    import contextlib
    import threading
    import time

    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server with a drain: on the first SIGTERM/SIGINT /health/ready turns 503 and new requests
        get 503 at once, while the requests already accepted run to the end (serve.drain_timeout in all,
        uvicorn's own shutdown included); then the process exits. A second signal stops at once."""

        def __init__(self, config, state, grace_s: float):
            super().__init__(config)
            self.keel_state, self.grace_s = state, grace_s

        def handle_exit(self, sig, frame):
            if self.keel_state.draining:
                return super().handle_exit(sig, frame)
            self.keel_state.draining = True

            def drain():
                end = time.monotonic() + self.grace_s
                while self.keel_state.inflight > 0 and time.monotonic() < end:
                    time.sleep(0.05)
                # uvicorn's own graceful shutdown gets what is left of the one drain budget, not a second one.
                self.config.timeout_graceful_shutdown = max(end - time.monotonic(), 0.5)
                super(DrainingServer, self).handle_exit(sig, frame)

            threading.Thread(target=drain, name="keel-drain", daemon=True).start()

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the captured SIGTERM after a graceful shutdown, which would end the process
            # with 143; a drained server exits 0.
            with super().capture_signals():
                yield
                self._captured_signals.clear()

    return DrainingServer


def _DrainingServer(config, state, grace_s: float):
    return _make_server_class()(config, state, grace_s)
