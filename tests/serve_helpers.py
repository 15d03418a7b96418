"""A real `keel serve` in a subprocess on a free loopback port, as a user would start it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from conftest import OFFLINE


class Server:
    def __init__(self, target: str, *args: str, env: dict | None = None, cwd: Path | None = None):
        cmd = [sys.executable, "-m", "keel", "serve", target, "--port", "0", *args]
        full_env = {**os.environ, **OFFLINE}
        full_env.pop("KEEL_API_KEYS", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, cwd=cwd
        )
        self.lines: list[str] = []
        self.url = None
        end = time.time() + 180
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r" at (http://127\.0\.0\.1:\d+)", line)
            if m:
                self.url = m.group(1)
                break
            if time.time() > end:
                break
        if self.url is None:
            self.stop()
            raise AssertionError("keel serve did not start:\n" + "".join(self.lines))
        threading.Thread(target=self._drain_output, daemon=True).start()
        while time.time() < end:
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise AssertionError("keel serve never became ready:\n" + "".join(self.lines))

    def _drain_output(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def metric(self, name: str, headers: dict | None = None) -> float:
        text = httpx.get(f"{self.url}/metrics", headers=headers or {}, timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def promote_under_load(
    server: Server, run_dir: Path, request, *, clients: int, before: int, after: int, timeout: float, ignore=()
) -> tuple[list, list[str]]:
    """Promote a copy of ``run_dir``'s own weights as learn/v0001 while ``clients`` loop over ``request(k, n) ->
    (path, body)`` and thumb each answer up; returns every status (a dropped connection as its error's name) and
    the model version each feedback row named. The swap happens after ``before`` feedback rows; the load goes on
    until ``after`` more rows follow the server's swap line (or ``timeout`` seconds)."""
    import asyncio
    import shutil

    from keel.io import atomic_write_json
    from keel.rundir import learn_state_file, version_dir

    statuses: list = []
    versions: list[str] = []
    done = threading.Event()
    swapped = "swapped model version base -> v0001"

    async def client(k: int, c: httpx.AsyncClient):
        while not done.is_set():
            path, body = request(k, len(statuses))
            try:
                r = await c.post(path, json=body)
                statuses.append(r.status_code)
                if r.status_code == 200:
                    fb = await c.post("/v1/feedback", json={"response_id": r.json()["id"], "thumbs": "up"})
                    statuses.append(fb.status_code)
                    versions.append(fb.json().get("model_version"))
            except httpx.HTTPError as e:  # a connection the server dropped counts as a failed request
                statuses.append(f"{type(e).__name__} at {time.monotonic():.1f}")

    def promote():
        try:
            while len(versions) < before:
                time.sleep(0.05)
            staging = run_dir.parent / f"{run_dir.name}-staging"
            shutil.copytree(run_dir, staging, ignore=shutil.ignore_patterns("learn", "feedback", *ignore))
            staging.rename(version_dir(run_dir, "v0001"))
            atomic_write_json(learn_state_file(run_dir), {"current": "v0001", "history": ["base", "v0001"]})
            end = time.monotonic() + timeout
            while time.monotonic() < end and swapped not in server.log:
                time.sleep(0.1)
            n = len(versions)
            while len(versions) < n + after and time.monotonic() < end:
                time.sleep(0.05)
        finally:
            done.set()

    async def main():
        worker = asyncio.get_running_loop().run_in_executor(None, promote)
        # a fresh connection per request: a kept-alive one the server closes as idle (serve.read_timeout_s) while
        # this process is starved on a busy machine would be the client's race, not a failure of the swap
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as c:
            await asyncio.gather(*(client(k, c) for k in range(clients)))
        await worker

    (run_dir / "learn").mkdir(exist_ok=True)
    asyncio.run(main())
    assert swapped in server.log, server.log[-3000:]
    return statuses, versions
