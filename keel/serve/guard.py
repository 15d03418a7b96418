"""What every request passes before a route sees it: API keys, the body-size limit, the content type, the
body's read deadline.

A pure ASGI middleware, so a 20 MB body is refused from its Content-Length (or, when chunked, as soon as
the running count passes the limit) without ever being read into memory. The body is read whole before the
route runs, within ``read_timeout_s``: a client that never finishes its body gets 408 and does not count as
in flight (it would hold up a SIGTERM drain), and one still sending when the drain starts gets 503.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import time
from pathlib import Path

from keel.errors import KeelError
from keel.serve.errors import envelope

OPEN_PATHS = ("/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready")  # keel's and KServe's
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")  # open to all with serve.public_docs
DOCS_ASSETS = "/docs/assets/"  # Swagger UI and ReDoc's files (keel/serve/docs.py)
KEYS_ENV = "KEEL_API_KEYS"
MIN_KEY_LENGTH = 8


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def load_key_digests(key_file: str | None = None) -> list[bytes]:
    """SHA-256 digests of the keys in $KEEL_API_KEYS (comma separated) and in ``key_file`` (one per line)."""
    keys = [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]
    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise KeelError(f"--api-key-file {key_file} not found; pass a file with one key per line")
        lines = path.read_text(encoding="utf-8").splitlines()
        keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not keys:
            raise KeelError(f"--api-key-file {key_file} holds no key; write one key per line")
    short = [k for k in keys if len(k) < MIN_KEY_LENGTH]
    if short:
        raise KeelError(
            f"{len(short)} API key(s) shorter than {MIN_KEY_LENGTH} characters (the minimum); use long "
            "random keys (python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return [digest(k) for k in keys]


def key_ok(presented: str, digests: list[bytes]) -> bool:
    """Constant-time comparison against every digest (no early exit that would leak which one matched)."""
    d = digest(presented)
    ok = False
    for known in digests:
        ok |= secrets.compare_digest(d, known)
    return ok


class Guard:
    """ASGI middleware: 401 without a valid key, 413 over the body limit, 415 for a non-JSON POST body, 408 for a
    body that does not arrive within ``read_timeout_s``. With ``public_docs`` the docs pages, their assets and
    /openapi.json need no key (a browser cannot send a bearer token); every other route still does."""

    def __init__(
        self,
        app,
        digests: list[bytes],
        max_body_bytes: int,
        state=None,
        metrics=None,
        known_paths: set | None = None,
        read_timeout_s: float = 10.0,
        public_docs: bool = False,
    ):
        self.app, self.digests, self.max_body, self.state = app, digests, max_body_bytes, state
        self.metrics, self.known, self.read_timeout = metrics, known_paths or set(), read_timeout_s
        self.public_docs = public_docs

    async def __call__(self, scope, receive, send):
        """Counts every answer (with its latency) for /metrics."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        draining = self.state is not None and self.state.draining
        if draining and scope.get("path") not in OPEN_PATHS:
            await _reply(
                send_status,
                503,
                "the server is shutting down; retry on another replica",
                code="draining",
                headers={"retry-after": "1", "connection": "close"},
            )
        else:
            await self._guarded(scope, receive, send_status)
        if self.metrics is not None:
            route = scope.get("path") if scope.get("path") in self.known else "other"
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)

    async def _guarded(self, scope, receive, send):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        is_docs = path in DOCS_PATHS or path.startswith(DOCS_ASSETS)
        if self.digests and path not in OPEN_PATHS and not (is_docs and self.public_docs):
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token.strip() or not key_ok(token.strip(), self.digests):
                hint = (
                    " (a browser cannot send one: serve.public_docs: true opens the docs without a key)"
                    if is_docs
                    else ""
                )
                return await _reply(
                    send,
                    401,
                    f"missing or invalid API key; send the header 'Authorization: Bearer <key>'{hint}",
                    code="invalid_api_key",
                    headers={"www-authenticate": "Bearer"},
                )
        length = headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                return await _reply(send, 400, "Content-Length is not a number", code="invalid_header")
            if too_big:
                return await _reply(
                    send,
                    413,
                    f"request body of {length} bytes is over the limit of {self.max_body} "
                    "bytes (serve.max_body_bytes); send fewer or shorter inputs",
                    code="body_too_large",
                )
        if scope.get("method") == "POST" and (length is None or length != "0"):
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return await _reply(
                    send,
                    415,
                    f"Content-Type must be application/json; got '{ctype or 'none'}'",
                    code="unsupported_media_type",
                )

        if scope.get("method") in ("POST", "PUT", "PATCH") and length != "0":
            body = await self._read_body(receive, send)
            if body is None:
                return
            replay = [{"type": "http.request", "body": body, "more_body": False}]

            async def replay_receive():
                return replay.pop() if replay else await receive()

            return await self._in_flight(scope, replay_receive, send)
        await self._in_flight(scope, receive, send)

    async def _in_flight(self, scope, receive, send):
        """The request counts as in flight (for the SIGTERM drain) from here to the end of its response,
        streamed bodies included."""
        if self.state is not None:
            self.state.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            if self.state is not None:
                self.state.inflight -= 1

    async def _read_body(self, receive, send) -> bytes | None:
        """The whole body (at most the limit: bounded memory, chunked or not), or None when the client left
        or was answered (413 over the limit, 408 past serve.read_timeout_s, 503 once the drain started)."""
        chunks, seen, more = [], 0, True
        end = time.monotonic() + self.read_timeout
        while more:
            left = end - time.monotonic()
            if left <= 0:
                await _reply(
                    send,
                    408,
                    f"the request body did not arrive within {self.read_timeout:g} s (serve.read_timeout_s)",
                    code="body_timeout",
                    headers={"connection": "close"},
                )
                return None
            try:  # short waits, so that a drain is noticed; an unfinished receive loses nothing
                message = await asyncio.wait_for(receive(), min(left, 0.25))
            except TimeoutError:
                if self.state is not None and self.state.draining:  # a slow body is not an accepted request
                    await _reply(
                        send,
                        503,
                        "the server is shutting down; retry on another replica",
                        code="draining",
                        headers={"retry-after": "1", "connection": "close"},
                    )
                    return None
                continue
            if message["type"] != "http.request":
                return None
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                await _reply(
                    send,
                    413,
                    f"request body is over the limit of {self.max_body} bytes (serve.max_body_bytes)",
                    code="body_too_large",
                )
                return None
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        return b"".join(chunks)


async def _reply(send, status: int, message: str, code: str | None = None, headers: dict | None = None) -> None:
    body = json.dumps(envelope(status, message, None, code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
