"""Dynamic batching vs one request per forward pass: the same model behind `keel serve`, 32 concurrent clients.

    python benchmarks/serve_classify.py                      # minilm-l6, /v1/embeddings
    python benchmarks/serve_classify.py --target runs/quickstart --route classify   # a classification run (ONNX)

Each request carries one text. "unbatched" is the same server with serve.max_batch_size=1 (every request
its own forward pass). Prints a table and writes benchmarks/results/serve-classify-<device>.json.
Target: >= 3x requests/s with p95 latency no worse than 1.2x.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time

from serve_common import KeelServer, percentile, write_result

WORDS = (
    "the self-driving car took me home safely tonight and the ride was smooth but a little slow near the "
    "bridge where traffic always piles up after work"
).split()


def text(i: int) -> str:
    k = 12 + i % 12
    return f"request {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(k))


async def load(url: str, route: str, n: int, concurrency: int) -> dict:
    """``concurrency`` keep-alive HTTP/1.1 connections, each sending its next request when the last one is answered.

    A wrk-style client written on asyncio streams: client and server share the 2 cores, and a full HTTP client
    library (httpx) spent so much CPU per request that it, not the server, set the pace.
    """
    host, port = url.removeprefix("http://").split(":")
    latencies, statuses, todo = [], [], list(range(n))

    async def connection(requests: list[int]):
        reader, writer = await asyncio.open_connection(host, int(port))
        for i in requests:
            body = json.dumps({"input": text(i)}).encode()
            t = time.perf_counter()
            writer.write(
                f"POST /v1/{route} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            length = next(int(h.split(":", 1)[1]) for h in head if h.lower().startswith("content-length:"))
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - t)
            statuses.append(int(head[0].split()[1]))
        writer.close()

    await asyncio.gather(*(connection([i]) for i in range(concurrency)))  # warm connections and kernels
    latencies.clear(), statuses.clear()
    t0 = time.perf_counter()
    await asyncio.gather(*(connection(todo[c::concurrency]) for c in range(concurrency)))
    wall = time.perf_counter() - t0
    return {
        "requests": n,
        "ok": statuses.count(200),
        "requests_per_s": n / wall,
        "p50_ms": percentile(latencies, 0.5) * 1e3,
        "p95_ms": percentile(latencies, 0.95) * 1e3,
        "wall_s": wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="minilm-l6", help="a run directory or model name")
    p.add_argument("--route", default="embeddings", choices=["embeddings", "classify"])
    p.add_argument("--requests", type=int, default=800)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=None, help="serve.num_threads")
    args = p.parse_args()
    threads = [f"serve.num_threads={args.threads}"] if args.threads else []
    rows = {}
    for name, sets in (
        ("unbatched", ["serve.max_batch_size=1", "serve.max_wait_ms=0"]),
        ("dynamic", [f"serve.max_batch_size={args.concurrency}", f"serve.max_wait_ms={args.max_wait_ms}"]),
    ):
        server = KeelServer(args.target, *sets, "serve.max_queue=4096", *threads)
        try:
            rows[name] = asyncio.run(load(server.url, args.route, args.requests, args.concurrency))
        finally:
            server.stop()
        print(
            f"{name:10s} {rows[name]['requests_per_s']:8.1f} req/s  p50 {rows[name]['p50_ms']:7.1f} ms  "
            f"p95 {rows[name]['p95_ms']:7.1f} ms  ok {rows[name]['ok']}/{args.requests}",
            flush=True,
        )
    speedup = rows["dynamic"]["requests_per_s"] / rows["unbatched"]["requests_per_s"]
    p95_ratio = rows["dynamic"]["p95_ms"] / rows["unbatched"]["p95_ms"]
    print(f"dynamic batching: {speedup:.2f}x requests/s, p95 {p95_ratio:.2f}x  (target >= 3x and <= 1.2x)")
    import torch

    device = "gpu" if torch.cuda.is_available() else "cpu"
    result = {
        "benchmark": "serve_classify",
        "target": args.target,
        "route": args.route,
        "concurrency": args.concurrency,
        "device": device,
        "cpu_count": __import__("os").cpu_count(),
        "machine": platform.machine(),
        "rows": rows,
        "speedup_requests_per_s": round(speedup, 3),
        "p95_ratio": round(p95_ratio, 3),
        "meets_target": speedup >= 3 and p95_ratio <= 1.2,
    }
    write_result(f"serve-classify-{device}", result)


if __name__ == "__main__":
    main()
