"""Shared by the serving benchmarks: start `keel serve` on a free loopback port, wait until ready, stop it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class KeelServer:
    def __init__(self, target: str, *sets: str):
        args = [a for s in sets for a in ("--set", s)]
        env = {**os.environ, **OFFLINE}
        env.pop("KEEL_API_KEYS", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "keel", "serve", target, "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.url, lines = None, []
        for line in self.proc.stdout:
            lines.append(line)
            m = re.search(r" at (http://127\.0\.0\.1:\d+)", line)
            if m:
                self.url = m.group(1)
                break
        if not self.url:
            raise SystemExit("keel serve did not start:\n" + "".join(lines))
        end = time.time() + 600
        while time.time() < end:
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise SystemExit("keel serve never became ready")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] if s else float("nan")
