"""Shared by the serving benchmarks: start `keel serve` on a free loopback port, wait until ready, stop it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

RESULTS = Path(__file__).parent / "results"
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class KeelServer:
    """`keel serve TARGET` on a free loopback port, until it answers /health/ready; its output is read on until it
    exits (a full pipe would block the server). A subclass adds its own flags and environment."""

    flags: tuple[str, ...] = ()
    unset_env: tuple[str, ...] = ("KEEL_API_KEYS",)

    def __init__(self, target: str, *sets: str):
        args = [a for s in sets for a in ("--set", s)]
        env = {**os.environ, **OFFLINE}
        for name in self.unset_env:
            env.pop(name, None)
        self.name = " ".join(["keel serve", *self.flags])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "keel", "serve", target, *self.flags, "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.url, lines = None, []
        for line in self.proc.stdout:
            lines.append(line)
            m = re.search(r" at (http://127\.0\.0\.1:\d+)", line)
            if m:
                self.url = m.group(1)
                break
        if not self.url:
            raise SystemExit(f"{self.name} did not start:\n" + "".join(lines[-40:]))
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
        self.wait_ready(600)

    def wait_ready(self, timeout: float) -> None:
        end = time.time() + timeout
        while time.time() < end and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{self.name} never became ready (exit code {self.proc.poll()})")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] if s else float("nan")


def write_result(name: str, result: dict) -> Path:
    """benchmarks/results/<name>.json, and say so."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return out


def decode_all(
    model, tok, prompts: list[list[int]], new_tokens: int, device: str = "cpu"
) -> tuple[float, list[list[int]]]:
    """Every prompt submitted at once to keel's continuous-batching scheduler, in this process, greedy, each run to
    its full length (EOS ignored): (seconds, the new token ids of each prompt)."""
    from keel.serve.scheduler import Scheduler, Sequence

    done, lock = {}, threading.Lock()

    def emit(index, kind, payload):
        if kind in ("done", "error"):
            with lock:
                done[index] = (kind, payload)

    sched = Scheduler(model, tok, max_running=len(prompts), device=device)
    sched.eos = set()
    seqs = [Sequence(ids, new_tokens, temperature=0.0, index=i, emit=emit) for i, ids in enumerate(prompts)]
    sched.start()
    t0 = time.perf_counter()
    sched.submit(seqs)
    while len(done) < len(seqs):
        time.sleep(0.002)
    seconds = time.perf_counter() - t0
    sched.stop()
    failed = [payload for kind, payload in done.values() if kind == "error"]
    if failed:
        raise SystemExit(f"generation failed: {failed[0]}")
    return seconds, [s.out_ids for s in seqs]
