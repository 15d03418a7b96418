"""The console's ASGI app (Starlette, as under `keel serve`): pages, the sandboxed report, and the chat proxy.

Auth is `keel serve`'s: with keys ($KEEL_API_KEYS, --api-key-file) every page but /login and /health needs a valid
``Authorization: Bearer`` key or the session cookie /login sets after one (digests compared in constant time);
without keys the Host header must be a loopback name, so a page elsewhere that rebinds its DNS to 127.0.0.1 gets
nothing. A POST must come from the console's own origin. Every HTML answer carries a CSP that allows only its own
nonce'd style (and script, on the chat page); the report is served with a CSP ``sandbox`` into an iframe with the
``sandbox`` attribute. The chat page posts to /api/chat, which forwards to keel serve's /v1/chat/completions with
the serve key held here: the page has one origin and never sees a key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from pathlib import Path
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from keel.serve.guard import key_ok
from keel.ui import compare, pages, plots, runs

logger = logging.getLogger(__name__)

COOKIE = "keel_ui_session"
OPEN_PATHS = ("/login", "/health", "/favicon.ico")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
MAX_CHAT_BYTES = 256 * 1024
MAX_SESSIONS = 1000


def csp(nonce: str) -> str:
    # style attributes are allowed: matplotlib's SVG colours every shape with one (they cannot run code)
    return (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; style-src-attr 'unsafe-inline'; "
        "img-src data:; connect-src 'self'; frame-src 'self'; form-action 'self'; base-uri 'none'; "
        "frame-ancestors 'none'"
    )


REPORT_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox; form-action 'none'; base-uri 'none'; "
    "frame-ancestors 'self'"
)
COMMON = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer", "cache-control": "no-store"}


def _html(text_of, status: int = 200, headers: dict | None = None) -> HTMLResponse:
    """``text_of(nonce)`` as a page with its CSP."""
    nonce = secrets.token_urlsafe(16)
    return HTMLResponse(
        text_of(nonce),
        status,
        headers={**COMMON, "content-security-policy": csp(nonce), "x-frame-options": "DENY", **(headers or {})},
    )


def _error(status: int, message: str, request: Request) -> Response:
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": message}, status, headers=COMMON)
    return _html(lambda n: pages.error_page(status, message, n), status)


class Console:
    """The app's state: the runs folder, the keys, the sessions signed in, where keel serve is."""

    def __init__(self, root: Path, digests: list[bytes], serve_url: str | None, serve_key: str | None, transport=None):
        self.root, self.digests = Path(root), digests
        self.serve_url, self.serve_key = (serve_url or "").rstrip("/") or None, serve_key
        self.transport = transport  # an httpx transport to keel serve (tests pass a mock one)
        self.sessions: list[bytes] = []  # SHA-256 digests of the cookies /login handed out

    # -- the gate every request passes ------------------------------------------------------------------

    def signed_in(self, request: Request) -> bool:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip() and key_ok(token.strip(), self.digests):
            return True
        cookie = request.cookies.get(COOKIE, "")
        return bool(cookie) and key_ok(cookie, self.sessions)

    def refusal(self, request: Request) -> Response | None:
        """Why this request is refused (a response), or None when it may go on."""
        if not self.digests:
            host = request.headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in LOOPBACK_NAMES:
                return _error(403, "open the console at the 127.0.0.1 address keel ui printed", request)
        if request.method == "POST":
            origin = request.headers.get("origin")
            mine = f"{request.url.scheme}://{request.headers.get('host', '')}"
            site = request.headers.get("sec-fetch-site", "same-origin")
            if (origin is not None and origin != mine) or site not in ("same-origin", "none"):
                return _error(403, "a request from another site is refused; use the console's own page", request)
        if self.digests and request.url.path not in OPEN_PATHS and not self.signed_in(request):
            if request.method == "GET" and not request.url.path.startswith("/api/"):
                return RedirectResponse("/login", 303, headers=COMMON)
            return JSONResponse(
                {"error": "missing or invalid API key; send the header 'Authorization: Bearer <key>'"},
                401,
                headers={**COMMON, "www-authenticate": "Bearer"},
            )
        return None

    def run_dir(self, name: str) -> Path:
        path = runs.run_path(self.root, name)
        if path is None:
            raise HTTPException(404, f"no run named {name!r} in {self.root}")
        return path

    # -- pages ----------------------------------------------------------------------------------------------

    def index(self, request: Request) -> Response:
        found = runs.list_runs(self.root)
        return _html(lambda n: pages.runs_page(found, str(self.root), n))

    def run(self, request: Request) -> Response:
        run = runs.details(self.run_dir(request.path_params["name"]))
        curves = plots.curves_svg(run["metrics"])
        return _html(lambda n: pages.run_page(run, str(self.root / run["name"]), curves, n))

    def report(self, request: Request) -> Response:
        folder = self.run_dir(request.path_params["name"])
        path = (folder / "report.html").resolve()
        if path.parent != folder or not path.is_file():
            raise HTTPException(404, f"{folder.name} has no report.html yet; keel report writes it")
        headers = {**COMMON, "content-security-policy": REPORT_CSP, "x-frame-options": "SAMEORIGIN"}
        return Response(path.read_bytes(), 200, media_type="text/html; charset=utf-8", headers=headers)

    def labels(self, request: Request) -> Response:
        folder = self.run_dir(request.path_params["name"])
        sessions = runs.label_sessions(folder)
        curve = plots.labels_svg(sessions)
        writer = runs.writer(folder) or {}
        live = writer.get("command") if " label " in f" {writer.get('command', '')} " else None
        path = str(self.root / folder.name)
        return _html(lambda n: pages.labels_page(folder.name, path, sessions, curve, n, live=live))

    def compare(self, request: Request) -> Response:
        names = [x for v in request.query_params.getlist("runs") for x in v.split(",") if x]
        names += request.query_params.getlist("run")
        names = list(dict.fromkeys(names))  # each run once, in the order asked
        if len(names) < 2:
            raise HTTPException(400, "compare needs two runs or more: /compare?runs=a,b (or tick them on the list)")
        chosen = [runs.details(self.run_dir(name)) for name in names]
        data = {
            "metrics": compare.metrics_rows(chosen),
            "fairness": [{a: v for a, v in compare.fairness_gaps(r).items()} for r in chosen],
            "fairness_svg": plots.fairness_svg(chosen),
            "pareto_svg": plots.pareto_svg(chosen),
            "privacy": compare.privacy_rows(chosen),
            "diffs": [((chosen[0]["name"], r["name"]), compare.recipe_diff(chosen[0], r)) for r in chosen[1:]],
        }
        return _html(lambda n: pages.compare_page(chosen, data, n))

    async def chat(self, request: Request) -> Response:
        models, problem = await self._models()
        return _html(lambda n: pages.chat_page(self.serve_url or "", models, problem, n))

    # -- keel serve, through this server -------------------------------------------------------------------

    def _serve_headers(self) -> dict:
        return {"authorization": f"Bearer {self.serve_key}"} if self.serve_key else {}

    async def _models(self) -> tuple[list[str], str | None]:
        import httpx

        if not self.serve_url:
            return [], "no keel serve to talk to: start one (keel serve RUN_DIR), then keel ui --serve-url URL"
        try:
            async with httpx.AsyncClient(timeout=3, transport=self.transport) as client:
                r = await client.get(f"{self.serve_url}/v1/models", headers=self._serve_headers())
        except httpx.HTTPError as err:
            return [], (
                f"no keel serve answers at {self.serve_url} ({type(err).__name__}); start one with "
                "keel serve RUN_DIR (a causal LM run for chat), then reload this page"
            )
        if r.status_code == 401:
            return [], f"keel serve at {self.serve_url} wants a key: pass keel ui --serve-key-file FILE"
        try:
            return [str(m.get("id")) for m in r.json().get("data", [])], None
        except (ValueError, AttributeError):
            return [], f"{self.serve_url} answered /v1/models with something other than keel serve's JSON"

    async def chat_api(self, request: Request) -> Response:
        import httpx

        if not self.serve_url:
            return _error(503, "keel ui was started without --serve-url; no keel serve to talk to", request)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _error(415, "send the chat as application/json", request)
        body = await _read(request, MAX_CHAT_BYTES)
        if body is None:
            return _error(413, f"a chat request is at most {MAX_CHAT_BYTES:,} bytes; send a shorter history", request)
        try:
            doc = json.loads(body)
            messages, max_tokens = doc["messages"], int(doc.get("max_tokens", 64))
            ok = isinstance(messages, list) and 0 < len(messages) <= 200 and 1 <= max_tokens <= 4096
            ok = ok and all(
                isinstance(m, dict)
                and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)
                for m in messages
            )
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            return _error(400, "send {messages: [{role, content}, ...], max_tokens: 1..4096}", request)
        upstream = {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
        upstream["max_tokens"] = max_tokens
        try:
            async with httpx.AsyncClient(timeout=120, transport=self.transport) as client:
                r = await client.post(
                    f"{self.serve_url}/v1/chat/completions", json=upstream, headers=self._serve_headers()
                )
        except httpx.HTTPError as err:
            return _error(502, f"keel serve at {self.serve_url} did not answer ({type(err).__name__})", request)
        try:
            answer = r.json()
        except ValueError:
            return _error(502, f"keel serve answered {r.status_code} without JSON", request)
        if r.status_code != 200:
            message = ((answer or {}).get("error") or {}).get("message") or f"status {r.status_code}"
            return _error(r.status_code if 400 <= r.status_code < 500 else 502, f"keel serve: {message}", request)
        try:
            reply = answer["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            return _error(502, "keel serve's answer has no choices[0].message.content", request)
        return JSONResponse(
            {"reply": reply, "model": answer.get("model"), "usage": answer.get("usage")}, headers=COMMON
        )

    # -- signing in -------------------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        if request.method == "GET":
            return _html(pages.login_page)
        body = await _read(request, 4096)
        key = (parse_qs((body or b"").decode("utf-8", "replace")).get("key") or [""])[0].strip()
        if not self.digests:
            return RedirectResponse("/", 303, headers=COMMON)
        if not key or not key_ok(key, self.digests):
            return _html(lambda n: pages.login_page(n, failed=True), 401)
        token = secrets.token_urlsafe(32)
        self.sessions = [*self.sessions[-(MAX_SESSIONS - 1) :], hashlib.sha256(token.encode()).digest()]
        response = RedirectResponse("/", 303, headers=COMMON)
        response.set_cookie(
            COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/"
        )
        return response


async def _read(request: Request, limit: int) -> bytes | None:
    """The body, or None once it passes ``limit`` bytes (never read whole into memory past that)."""
    chunks, seen = [], 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(
    root: str | Path, digests: list[bytes], serve_url: str | None = None, serve_key: str | None = None, transport=None
) -> Starlette:
    console = Console(Path(root), digests, serve_url, serve_key, transport)

    def gated(endpoint):
        import inspect

        if inspect.iscoroutinefunction(endpoint):

            async def handler(request: Request):
                return console.refusal(request) or await endpoint(request)
        else:
            from starlette.concurrency import run_in_threadpool

            async def handler(request: Request):  # file reading and plotting off the event loop
                return console.refusal(request) or await run_in_threadpool(endpoint, request)

        return handler

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"}, headers=COMMON)

    async def favicon(request: Request) -> Response:
        return Response(status_code=204, headers=COMMON)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        return _error(exc.status_code, str(exc.detail), request)

    routes = [
        Route("/", gated(console.index)),
        Route("/run/{name}", gated(console.run)),
        Route("/run/{name}/report", gated(console.report)),
        Route("/run/{name}/labels", gated(console.labels)),
        Route("/compare", gated(console.compare)),
        Route("/chat", gated(console.chat)),
        Route("/api/chat", gated(console.chat_api), methods=["POST"]),
        Route("/login", gated(console.login), methods=["GET", "POST"]),
        Route("/health", health),
        Route("/favicon.ico", favicon),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found})
    app.state.console = console
    return app
