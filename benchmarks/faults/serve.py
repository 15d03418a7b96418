"""Faults against a real `keel serve` on a tiny classification run: poison requests beside innocent ones.

    python benchmarks/faults/serve.py

- one client of 17 sends lone surrogates ("\\ud800", valid JSON, not text) to classify, embeddings and explain,
  while 16 send normal classify/embeddings requests: how many innocent requests fail (goal 0);
- four clients flood explain: true (16 long texts x 256 steps each) while one sends tiny classify requests one
  after another: the worst tiny-request latency (goal: under 2 s; the explanations answer 200, 429 or 504);
- a client sends half its headers and stalls: is it answered and closed (goal: 408 within serve.read_timeout_s);
- a client holds an unfinished body when SIGTERM lands: how long until the process exits (goal: within
  serve.drain_timeout + 3 s, exit 0).

Writes benchmarks/results/faults-serve.json. Runs against whatever `keel` PYTHONPATH points at (settings the
code does not know are left out, so the same script measures an older keel).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from common import OFFLINE, Row, report  # noqa: E402

os.environ.update(OFFLINE)

RECIPE = """
name: tiny
task: classification
model: {{name: tiny-bert, max_length: 64}}
data:
  path: {data}
  split: {{validation: 0.2, test: 0.2, seed: 0}}
train: {{epochs: 1, batch_size: 8, lr: 3.0e-3, warmup_ratio: 0.0, max_steps: 3}}
"""
LONG = "the ride along the coast was long and the driver told us about every village on the way " * 2
SURROGATE_BODIES = [
    ("/v1/classify", json.dumps({"input": "bad \ud800 text"})),
    ("/v1/embeddings", json.dumps({"input": ["fine", "bad \udfff"]})),
    ("/v1/classify", json.dumps({"input": ["\ud83d"], "explain": True})),
]


def make_run(work: Path) -> Path:
    from keel.pipeline import train_run
    from keel.recipe import load_recipe

    lines = ["text,label"] + [
        f"the trip was {'great' if i % 2 else 'awful'} number {i},{'pos' if i % 2 else 'neg'}" for i in range(80)
    ]
    (work / "toy.csv").write_text("\n".join(lines) + "\n")
    (work / "tiny.yaml").write_text(RECIPE.format(data=work / "toy.csv"))
    return train_run(load_recipe(work / "tiny.yaml", [f"output.dir={work / 'runs' / 'tiny'}"]))


def known(settings: list[str]) -> list[str]:
    """The settings this keel knows (an older one has no read_timeout_s or drain_timeout)."""
    from keel.recipe import ServeConfig

    return [s for s in settings if s.split("=")[0].removeprefix("serve.") in ServeConfig.model_fields]


async def poison_mix(url: str, seconds: float) -> Row:
    innocent, failed, poison = Counter(), Counter(), Counter()

    async def normal(http, k):
        end, i = time.monotonic() + seconds, 0
        while time.monotonic() < end:
            path = ("/v1/classify", "/v1/embeddings")[(k + i) % 2]
            i += 1
            try:
                r = await http.post(path, json={"input": [f"client {k} request {i} was great", "and fine"]})
                status = r.status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            innocent[path] += 1
            if status != 200:
                failed[status] += 1

    async def attacker(http):
        end, i = time.monotonic() + seconds, 0
        while time.monotonic() < end:
            path, body = SURROGATE_BODIES[i % len(SURROGATE_BODIES)]
            i += 1
            try:
                r = await http.post(path, content=body, headers={"Content-Type": "application/json"})
                poison[r.status_code] += 1
            except httpx.HTTPError as e:
                poison[type(e).__name__] += 1

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=32)) as http:
        await asyncio.gather(*(normal(http, k) for k in range(16)), attacker(http))
    total, bad = sum(innocent.values()), sum(failed.values())
    return Row(
        "1 of 17 clients sends lone surrogates (classify, embeddings, explain)",
        "0 innocent requests fail; the poison gets 400",
        f"{bad:,} of {total:,} innocent requests failed{f' {dict(failed)}' if failed else ''}; "
        f"poison answered {dict(poison)}",
        bad == 0 and set(poison) == {400},
    )


async def explain_flood(url: str, seconds: float) -> Row:
    heavy, light = Counter(), []
    body = {"input": [f"{LONG} number {i}" for i in range(16)], "explain": True, "explain_steps": 256}

    async def flood(http):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                heavy[(await http.post("/v1/classify", json=body)).status_code] += 1
            except httpx.HTTPError as e:
                heavy[type(e).__name__] += 1

    async def probe(http):
        await asyncio.sleep(1.0)  # the flood is under way
        end = time.monotonic() + seconds - 1.0
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                status = (await http.post("/v1/classify", json={"input": "a tiny one"})).status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            light.append((time.perf_counter() - t0, status))

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        alone = []
        end = time.monotonic() + 4.0
        while time.monotonic() < end:  # the same tiny requests without the flood, for comparison
            t0 = time.perf_counter()
            try:
                await http.post("/v1/classify", json={"input": "a tiny one"})
            except httpx.HTTPError:
                pass
            alone.append(time.perf_counter() - t0)
        await asyncio.gather(*(flood(http) for _ in range(4)), probe(http))
    worst = max(t for t, _ in light)
    p50 = sorted(t for t, _ in light)[len(light) // 2]
    failed = sum(s != 200 for _, s in light)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return Row(
        "4 clients flood explain: true (16 long texts x 256 steps) beside tiny classify requests",
        "worst tiny-request latency < 2 s, none fails; explain answers only 200/429/504",
        f"worst {worst:.2f} s, p50 {p50:.3f} s over {len(light)} tiny requests ({failed} failed; alone: "
        f"worst {max(alone):.2f} s, p50 {sorted(alone)[len(alone) // 2]:.3f} s; load average {load:.1f}); "
        f"explain answered {dict(heavy)}",
        worst < 2.0 and failed == 0 and set(heavy) <= {200, 429, 504},
    )


def slow_headers(url: str, read_timeout_s: float) -> Row:
    host, port = url.removeprefix("http://").split(":")
    limit = read_timeout_s + 2
    with socket.create_connection((host, int(port)), timeout=limit) as s:
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-")
        t0, reply = time.monotonic(), b""
        try:
            while chunk := s.recv(65536):
                reply += chunk
            first = reply.split(b"\r\n")[0].decode() or "no answer"
            observed = f"closed after {time.monotonic() - t0:.1f} s: {first}"
        except TimeoutError:
            observed = f"still open after {limit:g} s"
    ok = reply.startswith(b"HTTP/1.1 408") and b"application/json" in reply
    return Row("a client sends half its headers and stalls", f"408 in JSON and closed within {limit:g} s", observed, ok)


def sigterm_with_slow_body(target: str, drain_timeout: float) -> Row:
    from serve_common import KeelServer

    server = KeelServer(
        target,
        *known(
            [
                "serve.num_threads=1",
                "serve.timeout_s=10",
                "serve.read_timeout_s=60",
                f"serve.drain_timeout={drain_timeout:g}",
            ]
        ),
    )
    host, port = server.url.removeprefix("http://").split(":")
    slow = socket.create_connection((host, int(port)), timeout=120)
    slow.sendall(
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"input": '
    )
    time.sleep(0.5)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(timeout=300)
    took = time.monotonic() - t0
    slow.close()
    limit = drain_timeout + 3
    return Row(
        "a client holds an unfinished body when SIGTERM lands",
        f"exit 0 within serve.drain_timeout + 3 s = {limit:g} s",
        f"exit {code} after {took:.1f} s",
        code == 0 and took <= limit,
    )


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="keel-faults-serve-"))
    os.environ.setdefault("KEEL_CACHE_DIR", str(work / "cache"))
    target = str(make_run(work))
    from serve_common import KeelServer

    read_timeout_s = 5.0
    settings = known(
        [
            "serve.num_threads=1",
            "serve.max_wait_ms=5",
            "serve.max_queue=1024",
            "serve.timeout_s=10",
            f"serve.read_timeout_s={read_timeout_s:g}",
        ]
    )
    rows = []
    for attacks in (
        [lambda url: asyncio.run(poison_mix(url, 20.0))],  # a fresh server for each group: one that
        [
            lambda url: asyncio.run(explain_flood(url, 25.0)),  # a fault wedged does not spoil the next
            lambda url: slow_headers(url, read_timeout_s),
        ],
    ):
        server = KeelServer(target, *settings)
        try:
            rows += [attack(server.url) for attack in attacks]
        finally:
            server.proc.kill()
            server.proc.wait()
    rows.append(sigterm_with_slow_body(target, drain_timeout=5.0))
    report("serve", rows)


if __name__ == "__main__":
    main()
