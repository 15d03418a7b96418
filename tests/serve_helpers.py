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
