"""/docs and /redoc work offline (their assets come from keel itself), serve.public_docs opens them to a browser
when keys are set, and the printed examples read the key from where the server did."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import keel
from serve_helpers import Server

pytestmark = pytest.mark.slow  # starts `keel serve` and headless Chromium

KEY, KEY2 = "docs-key-0123456789", "docs-key-second-abc"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def docs_server():
    server = Server(
        "tiny-bert",
        "--set",
        "serve.public_docs=true",
        "--set",
        "serve.num_threads=1",
        env={"KEEL_API_KEYS": f"{KEY},{KEY2}"},
    )
    yield server
    server.stop()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _render(url: str, tmp_path, ready_js: str) -> tuple[str, list[str]]:
    """Open ``url`` in headless Chromium and return (the page's text once ``ready_js`` is true, every URL the page
    requested). DNS resolves nothing but 127.0.0.1, so a request for anything else fails; the DevTools protocol's
    request log shows whether the page tried."""
    from websockets.sync.client import connect

    proc = subprocess.Popen(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-extensions",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        devtools = None
        for line in proc.stderr:
            m = re.search(r"DevTools listening on ws://([\d.]+:\d+)/", line)
            if m:
                devtools = m.group(1)
                break
        assert devtools, "chromium did not start its DevTools endpoint"
        page = next(t for t in httpx.get(f"http://{devtools}/json/list", timeout=10).json() if t["type"] == "page")
        requested, seq = [], [0]
        with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:

            def call(method: str, **params):
                seq[0] += 1
                ws.send(json.dumps({"id": seq[0], "method": method, "params": params}))
                while True:
                    msg = json.loads(ws.recv(timeout=30))
                    if msg.get("method") == "Network.requestWillBeSent":
                        requested.append(msg["params"]["request"]["url"])
                    if msg.get("id") == seq[0]:
                        return msg.get("result", {})

            call("Network.enable")
            call("Page.navigate", url=url)
            end = time.time() + 60
            while time.time() < end:
                done = call("Runtime.evaluate", expression=ready_js, returnByValue=True)["result"].get("value")
                if done:
                    break
                time.sleep(0.25)
            time.sleep(0.5)  # late requests (fonts, icons, validators) still land in the log
            text = call("Runtime.evaluate", expression="document.body.innerText", returnByValue=True)
        return text["result"].get("value", ""), requested
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _off_host(urls: list[str]) -> list[str]:
    return [
        u for u in urls if urlsplit(u).scheme not in ("data", "blob", "about") and urlsplit(u).hostname != "127.0.0.1"
    ]


@pytest.mark.skipif(
    _chromium() is None, reason="chromium is not installed (apt-get install chromium); .ci/run installs it"
)
def test_docs_render_their_operations_with_no_request_leaving_the_machine(docs_server, tmp_path):
    operations = httpx.get(f"{docs_server.url}/openapi.json").json()["paths"]
    assert "/v1/embeddings" in operations
    text, requested = _render(
        f"{docs_server.url}/docs", tmp_path, "document.querySelectorAll('.opblock-summary-path').length > 0"
    )
    assert _off_host(requested) == [], requested
    assert any("/docs/assets/swagger-ui-bundle.js" in u for u in requested)
    for path in operations:  # every operation of the API is listed
        assert path in text, (path, text[:2000])

    text, requested = _render(
        f"{docs_server.url}/redoc", tmp_path, "document.querySelectorAll('[data-section-id^=\"operation\"]').length > 0"
    )
    assert _off_host(requested) == [], requested
    for path in operations:
        assert path in text, (path, text[:2000])


def test_public_docs_open_the_docs_and_nothing_else(docs_server):
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/assets/swagger-ui-bundle.js", "/docs/assets/favicon.png"):
        r = httpx.get(f"{docs_server.url}{path}", timeout=30)
        assert r.status_code == 200, (path, r.text[:200])
    for path in ("/v1/models", "/metrics", "/docs/../v1/models", "/docsx"):
        r = httpx.get(f"{docs_server.url}{path}", timeout=30)
        assert r.status_code == 401, (path, r.text[:200])
    r = httpx.post(f"{docs_server.url}/v1/embeddings", json={"input": "hi"}, timeout=30)
    assert r.status_code == 401
    host, port = urlsplit(docs_server.url).hostname, urlsplit(docs_server.url).port
    with socket.create_connection((host, port), timeout=30) as sock:  # a raw path: no client folds the dots
        sock.sendall(b"GET /docs/assets/../../v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    assert answer.startswith(b"HTTP/1.1 404") and b"tiny-bert" not in answer, answer[:300]


def test_docs_need_a_key_by_default_and_the_401_says_how_to_open_them():
    import asyncio

    from keel.serve.guard import Guard, digest

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def get(guard, path):
        transport = httpx.ASGITransport(app=guard)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path)

    closed = Guard(app, [digest(KEY)], 1 << 20)
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/assets/swagger-ui.css"):
        r = asyncio.run(get(closed, path))
        assert r.status_code == 401 and "serve.public_docs" in r.json()["error"]["message"], path
    r = asyncio.run(get(closed, "/v1/models"))
    assert r.status_code == 401 and "public_docs" not in r.json()["error"]["message"]
    opened = Guard(app, [digest(KEY)], 1 << 20, public_docs=True)
    assert asyncio.run(get(opened, "/docs")).status_code == 200
    assert asyncio.run(get(opened, "/v1/models")).status_code == 401


def _run_examples(server: Server, env: dict) -> None:
    """Run the printed curl and openai examples as a user would paste them into a shell."""
    lines = server.log.split("\n")
    curl = next(ln for ln in lines if ln.startswith("curl "))
    start = next(i for i, ln in enumerate(lines) if ln.startswith("python - <<'EOF'"))
    py = "\n".join(lines[start : lines.index("EOF", start) + 1])
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    full_env = {**{k: v for k, v in os.environ.items() if k != "KEEL_API_KEYS"}, "PATH": path, **env}
    r = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, env=full_env, timeout=60)
    assert r.returncode == 0 and '"embedding"' in r.stdout, (curl, r.stdout[:300], r.stderr[-300:])
    curl_out = r.stdout
    r = subprocess.run(["bash", "-c", py], capture_output=True, text=True, env=full_env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "32", (py, r.stdout[-300:], r.stderr[-1000:])
    return curl_out, r.stdout.strip()


def test_the_printed_examples_work_with_the_keys_from_the_environment(docs_server):
    curl_out, dims = _run_examples(docs_server, {"KEEL_API_KEYS": f"{KEY},{KEY2}"})
    assert '"embedding"' in curl_out and dims == "32"  # both printed examples answered with the server's keys


def test_the_printed_examples_work_with_the_keys_from_a_file(tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text(f"# keys, one a line\n\n{KEY2}\n{KEY}\n")
    server = Server("tiny-bert", "--api-key-file", str(key_file), "--set", "serve.num_threads=1")
    try:
        assert "KEEL_API_KEYS" not in server.log  # the server had no key from the environment
        _run_examples(server, {})
    finally:
        server.stop()


def test_a_short_key_error_states_the_minimum_length(tmp_path):
    r = keel("serve", "tiny-bert", "--port", "0", cwd=tmp_path, env={"KEEL_API_KEYS": "short"})
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "shorter than 8 characters (the minimum)" in err
