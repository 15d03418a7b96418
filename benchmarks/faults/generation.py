"""Faults on the generation side of `keel serve`: one request must never fail another.

    python benchmarks/faults/generation.py

Against a real `keel serve tiny-llama` (a tiny random causal LM, offline) over HTTP:
- several seeded streams run while one client sends `temperature: 1e-45` (softmax of logits / 1e-45 is NaN, and a
  NaN row used to fail the whole decode batch); counted: innocent streams that did not end with a finish_reason;
- a request that can never fit the generation queue (256 prompts x n=8 against serve.max_queue=256): 400, not a
  429 that a client would retry forever;
- a non-streaming client that disconnects mid-generation: its sequence must leave the running batch (the running
  gauge drops to 0 long before max_tokens would be reached), measured on /metrics;
- 4 queued clients that go away while the running batch is full: their places are free for the next client at once
  (it used to get 429 until the running sequence ended);
- a prompt that alone fills the context: context_length_exceeded must name `prompt`, not `max_tokens`;
- 1.8 MB of chat messages: templating and tokenizing them must not stall the event loop (/health/live keeps
  answering meanwhile).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import Row, report  # noqa: E402
from serve_common import KeelServer  # noqa: E402


def metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_idle(url: str, timeout: float = 60.0) -> float:
    """Seconds until the running gauge reads 0 (or ``timeout``)."""
    start = time.monotonic()
    while metric(url, "keel_running_sequences") > 0 and time.monotonic() - start < timeout:
        time.sleep(0.05)
    return time.monotonic() - start


def stream_outcome(url: str, body: dict, results: list, started: threading.Event | None = None) -> None:
    """One streamed completion; appends 'ok' (every choice ended with a finish_reason, then [DONE]) or the error."""
    finished, error = 0, None
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as r:
            if r.status_code != 200:
                results.append(f"HTTP {r.status_code}")
                return
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if started is not None:
                    started.set()
                if "error" in event:
                    error = event["error"].get("message", "error")
                elif event["choices"] and event["choices"][0].get("finish_reason"):
                    finished += 1
    except httpx.HTTPError as e:
        error = type(e).__name__
    results.append("ok" if finished == body.get("n", 1) and error is None else (error or "no finish_reason"))


def nan_temperature(url: str) -> list[Row]:
    innocents, bad, started = [], [], threading.Event()
    threads = [
        threading.Thread(
            target=stream_outcome,
            args=(
                url,
                {"prompt": f"Story number {i}", "max_tokens": 120, "temperature": 0.8, "seed": i},
                innocents,
                started,
            ),
        )
        for i in range(6)
    ]
    for t in threads:
        t.start()
    started.wait(60)
    time.sleep(0.2)  # the innocent streams are decoding when the bad request joins
    stream_outcome(url, {"prompt": "Hello", "max_tokens": 8, "temperature": 1e-45}, bad)
    for t in threads:
        t.join(120)
    failed = sum(r != "ok" for r in innocents)
    reasons = sorted({r for r in innocents if r != "ok"})
    rows = [
        Row(
            "1 client sends temperature 1e-45 beside 6 running streams",
            "0 innocent streams fail",
            f"{failed} of {len(innocents)} innocent streams failed" + (f" ({reasons[0]})" if reasons else ""),
            failed == 0 and len(innocents) == 6,
        ),
        Row("temperature 1e-45 itself", "answered (greedy)", f"its stream: {bad[0]}", bad == ["ok"]),
    ]
    wait_idle(url)
    return rows


def never_fits(url: str) -> Row:
    body = {"prompt": ["hi"] * 256, "n": 8, "max_tokens": 1}
    codes = []
    for _ in range(3):  # a 429 would be retried forever: each try gets the same answer
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        codes.append(r.status_code)
        time.sleep(0.3)
    param = r.json().get("error", {}).get("param") if r.status_code != 200 else None
    return Row(
        "256 prompts x n=8 against serve.max_queue=256 (3 tries)",
        "400 every time (not 429)",
        f"statuses {codes}" + (f", param {param}" if param else ""),
        codes == [400] * 3,
    )


def disconnect(url: str) -> Row:
    """A raw socket sends a non-streaming request and closes after 0.5 s, while tokens are still coming."""
    wait_idle(url)
    before = metric(url, "keel_generated_tokens_total")
    sock = _raw_post(url, {"prompt": "Hello", "max_tokens": 500, "n": 8, "temperature": 0})
    t0 = time.monotonic()
    while metric(url, "keel_running_sequences") == 0 and time.monotonic() - t0 < 30:
        time.sleep(0.02)
    time.sleep(0.5)
    sock.close()
    idle_after = wait_idle(url, timeout=120)
    time.sleep(0.2)
    generated = int(metric(url, "keel_generated_tokens_total") - before)
    stopped = idle_after < 3.0 and generated < 8 * 500
    return Row(
        "a non-streaming client (n=8, max_tokens=500) disconnects after 0.5 s",
        "its sequences stop at once (< 3 s, not all tokens)",
        f"running -> 0 {idle_after:.1f} s after the disconnect; {generated} of {8 * 500} tokens generated",
        stopped,
    )


def _raw_post(url: str, body: dict) -> socket.socket:
    u = urlparse(url)
    data = json.dumps(body).encode()
    sock = socket.create_connection((u.hostname, u.port))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data
    )
    return sock


def queued_clients_leave(url: str) -> Row:
    """With the running batch full, 4 queued clients go away; their places must be free for the next client.

    Valid only while the running sequence is still running when the next client comes (else the queue drains
    anyway): up to 3 tries for one that is.
    """
    for _ in range(3):
        results: list = []
        started = threading.Event()
        runner = threading.Thread(
            target=stream_outcome,
            args=(url, {"prompt": "Keep going", "max_tokens": 500, "temperature": 0}, results, started),
        )
        runner.start()
        started.wait(60)
        queued = [_raw_post(url, {"prompt": f"queued {i}", "max_tokens": 4}) for i in range(4)]
        end = time.monotonic() + 10
        while metric(url, "keel_queue_depth") < 4 and time.monotonic() < end:
            time.sleep(0.01)
        depth = metric(url, "keel_queue_depth")
        for sock in queued:
            sock.close()
        time.sleep(0.2)
        valid = not results  # the running sequence has not ended
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "next", "max_tokens": 4}, timeout=120)
        runner.join(120)
        wait_idle(url)
        if valid:
            break
    return Row(
        "4 queued clients disconnect while the batch is full (max_running=1, max_queue=4)",
        "the next client is served (not 429)",
        f"queue depth {depth:g} -> next client HTTP {r.status_code}" + ("" if valid else " (batch ended first)"),
        valid and depth == 4 and r.status_code == 200,
    )


def prompt_too_long(url: str) -> Row:
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hello " * 600, "max_tokens": 4}, timeout=30)
    err = r.json().get("error", {})
    return Row(
        "a prompt that alone is over the context (600 words, context 512)",
        "400 context_length_exceeded naming prompt",
        f"{r.status_code} {err.get('code')} param={err.get('param')}",
        r.status_code == 400 and err.get("code") == "context_length_exceeded" and err.get("param") == "prompt",
    )


def big_chat_blocks_loop(url: str) -> Row:
    """While 1.8 MB of chat messages is templated and tokenized, /health/live must still answer.

    Compared with the time the same templating and tokenization takes in this process (the request's total
    time also counts reading and validating the body, which the loop interleaves with other requests anyway):
    a loop that tokenizes answers no probe for about that long.
    """
    from transformers import AutoTokenizer

    from keel.models.registry import model_dir

    text = "lorem ipsum dolor sit amet " * 22_000  # 594 kB a message, under the 1 MB a message and 2 MB a body
    messages = [{"role": "user", "content": text}] * 3
    done = threading.Event()
    probes: list[float] = []

    def probe():
        while not done.is_set():
            t = time.monotonic()
            httpx.get(f"{url}/health/live", timeout=60)
            probes.append(time.monotonic() - t)
            time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    time.sleep(0.3)
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 1}, timeout=300)
    done.set()
    prober.join()
    tok = AutoTokenizer.from_pretrained(model_dir("tiny-llama"))
    t = time.monotonic()
    tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    tokenize_s = time.monotonic() - t
    worst = max(probes)
    return Row(
        "1.8 MB of chat messages is templated and tokenized",
        "/health/live answers meanwhile (worst < 1/3 of the tokenization)",
        f"worst /health/live {worst:.2f} s; tokenizing takes {tokenize_s:.2f} s (HTTP {r.status_code} "
        f"{r.json()['error'].get('code') if r.status_code != 200 else ''})",
        worst < tokenize_s / 3,
    )


def main() -> None:
    server = KeelServer(
        "tiny-llama",
        "serve.num_threads=1",
        "serve.max_running=16",
        "serve.max_queue=256",
        "serve.max_inputs=256",
        "serve.max_n=8",
    )
    try:
        rows = nan_temperature(server.url)
        rows.append(never_fits(server.url))
        rows.append(disconnect(server.url))
        rows.append(prompt_too_long(server.url))
        rows.append(big_chat_blocks_loop(server.url))
    finally:
        server.stop()
    server = KeelServer("tiny-llama", "serve.num_threads=1", "serve.max_running=1", "serve.max_queue=4")
    try:
        rows.append(queued_clients_leave(server.url))
    finally:
        server.stop()
    report("generation", rows)


if __name__ == "__main__":
    main()
