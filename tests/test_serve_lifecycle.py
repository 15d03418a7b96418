"""`keel serve` under pressure and at the end of its life: a bounded queue (only 200/429), a per-request
deadline (504, or an SSE error event), and a SIGTERM drain that loses no accepted request and exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import pytest
from serve_helpers import Server

pytestmark = pytest.mark.slow  # starts `keel serve`


def test_overload_answers_only_200_or_429_and_recovers():
    server = Server(
        "tiny-llama", "--set", "serve.max_running=2", "--set", "serve.max_queue=3", "--set", "serve.num_threads=1"
    )
    try:

        async def burst():
            async with httpx.AsyncClient(
                base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=64)
            ) as http:
                body = {"prompt": "Hello", "max_tokens": 40, "temperature": 0}
                return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(48)))

        replies = asyncio.run(burst())
        statuses = [r.status_code for r in replies]
        assert set(statuses) <= {200, 429}, statuses
        assert 200 in statuses and 429 in statuses
        for r in replies:
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "queue_full"
        after = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=30)
        assert after.status_code == 200
        assert server.metric("keel_rejected_total") == statuses.count(429)
    finally:
        server.stop()


def test_deadline_is_a_504_or_an_sse_error_event_and_frees_the_batch():
    server = Server("tiny-llama", "--set", "serve.timeout_s=0.3", "--set", "serve.num_threads=1")
    try:
        body = {"prompt": "Hello " * 50, "max_tokens": 400, "temperature": 0}
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=30) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "timeout"
        deadline = time.time() + 10
        while server.metric("keel_running_sequences") > 0 and time.time() < deadline:
            time.sleep(0.05)
        assert server.metric("keel_running_sequences") == 0
    finally:
        server.stop()


def test_sigterm_drains_accepted_requests_and_exits_0():
    server = Server("tiny-llama", "--set", "serve.num_threads=1")
    results, errors = [], []

    def call(i):
        body = {"prompt": f"Story number {i}", "max_tokens": 400, "temperature": 0}
        try:
            if i % 2:
                with httpx.stream(
                    "POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=120
                ) as s:
                    lines = [line for line in s.iter_lines() if line.startswith("data: ")]
                finish = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines[:-1]]
                results.append((s.status_code, lines[-1] == "data: [DONE]" and finish[-1] in ("length", "stop")))
            else:
                r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
                results.append((r.status_code, r.json()["choices"][0]["finish_reason"] in ("length", "stop")))
        except httpx.HTTPError as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while server.metric("keel_running_sequences") < 3 and time.time() < deadline:
        time.sleep(0.02)
    assert server.metric("keel_running_sequences") >= 3  # requests are in flight when the signal lands
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    ready = httpx.get(f"{server.url}/health/ready", timeout=10)
    late = httpx.post(f"{server.url}/v1/completions", json={"prompt": "late", "max_tokens": 2}, timeout=10)
    for t in threads:
        t.join(timeout=120)
    code = server.proc.wait(timeout=60)
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "draining"
    assert late.status_code == 503
    assert errors == [] and results == [(200, True)] * 6
    assert code == 0, server.log[-2000:]
