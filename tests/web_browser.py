"""Headless Chromium driven over the DevTools protocol, for the web export's tests and benchmarks/web_latency.py.

Every request the page makes, every console error and every uncaught exception is recorded. DNS resolves nothing
but 127.0.0.1, so a request to another host fails; the request log shows whether the page tried.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """One headless Chromium with one page; ``evaluate`` runs JavaScript there and awaits its promise."""

    def __init__(self, profile: Path):
        import httpx
        from websockets.sync.client import connect

        self.proc = subprocess.Popen(
            [
                chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-extensions",
                f"--user-data-dir={profile}",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        devtools = None
        for line in self.proc.stderr:
            m = re.search(r"DevTools listening on ws://([\d.]+:\d+)/", line)
            if m:
                devtools = m.group(1)
                break
        if devtools is None:
            self.close()
            raise RuntimeError("chromium did not start its DevTools endpoint")
        targets = httpx.get(f"http://{devtools}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None)
        self.requested: list[str] = []
        self.errors: list[str] = []  # console.error lines, uncaught exceptions, failed loads and CSP refusals
        self._seq = 0
        for domain in ("Network", "Runtime", "Log", "Page"):
            self.call(f"{domain}.enable")

    def _event(self, msg: dict) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Network.requestWillBeSent":
            self.requested.append(params["request"]["url"])
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.errors.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            self.errors.append(params["entry"].get("text", ""))

    def call(self, method: str, timeout: float = 60, **params) -> dict:
        self._seq += 1
        self.ws.send(json.dumps({"id": self._seq, "method": method, "params": params}))
        end = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, end - time.monotonic())))
            if msg.get("id") == self._seq:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._event(msg)

    def evaluate(self, expression: str, timeout: float = 120):
        """The value of ``expression`` (a promise is awaited); raises RuntimeError with the page's exception."""
        result = self.call(
            "Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    def open(self, url: str, ready: str = "window.keel && window.keel.ready", timeout: float = 120) -> None:
        """Navigate to ``url`` and await the page's ``ready`` expression."""
        self.call("Page.navigate", url=url)
        end = time.monotonic() + timeout
        while time.monotonic() < end:  # the new document's window.keel appears once its module script ran
            if self.evaluate("typeof window.keel === 'object' && location.href !== 'about:blank'"):
                break
            time.sleep(0.1)
        self.evaluate(ready, timeout=timeout)

    def load(self, url: str, timeout: float = 60) -> None:
        """Navigate to ``url`` and wait for its load event (iframes included): for pages without a window.keel."""
        self.evaluate("window.__left = true")  # the old document carries this; the new one does not
        self.call("Page.navigate", url=url)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.evaluate("!window.__left && document.readyState === 'complete'"):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{url} did not finish loading within {timeout:g} s")

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def off_origin(urls: list[str], origin: str) -> list[str]:
    """The URLs of ``urls`` that leave ``origin`` (data:, blob: and about: stay in the page)."""
    host = urlsplit(origin)
    return [
        u
        for u in urls
        if urlsplit(u).scheme not in ("data", "blob", "about")
        and (urlsplit(u).hostname, urlsplit(u).port) != (host.hostname, host.port)
    ]


class AddressedProcess:
    """A server process that prints its loopback URL on its first line; ``url`` is what ``pattern`` matched there."""

    def __init__(self, cmd: list[str], pattern: str, what: str, env: dict | None = None, stderr=subprocess.DEVNULL):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        line = self.proc.stdout.readline()
        m = re.search(pattern, line)
        if not m:
            self.stop()
            raise RuntimeError(f"{what} did not print its address: {line!r}{self.proc.stdout.read()}")
        self.url = m.group(m.lastindex or 0)

    def stop(self, timeout: float = 20) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class StaticServer(AddressedProcess):
    """The export's own serve.py on a free loopback port (cross-origin isolated: WASM threads work)."""

    def __init__(self, folder: Path):
        super().__init__([sys.executable, str(folder / "serve.py"), "0"], r"http://127\.0\.0\.1:\d+/", "serve.py")
