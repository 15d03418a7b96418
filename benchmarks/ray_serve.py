"""Ray Serve with 1 and 2 replicas against one `keel serve`: requests/s and p95 at concurrency 64, and what a
replica kill costs.

    python benchmarks/ray_serve.py                       # minilm-l6, /v1/embeddings, 2 alternating rounds
    python benchmarks/ray_serve.py --target runs/quickstart --route classify

The three servers stay up side by side (each Ray one is its own local cluster) and are measured in alternating
rounds with the same client (benchmarks/serve_classify.py's keep-alive HTTP/1.1 client, one text a request).
Then, on the 2-replica deployment under the same load (the same client, reconnecting after a failed request), one
replica is SIGKILLed: the failed requests are counted against the requests in flight at the kill,
with requests/s before the kill, until Ray has replaced the replica, and after. Writes
benchmarks/results/ray-serve-<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import time

from serve_classify import load, text
from serve_common import KeelServer, percentile, write_result


class RayServer(KeelServer):
    """`keel serve TARGET --ray` on a free port, until it answers /health/ready; its own local Ray cluster."""

    flags = ("--ray",)
    unset_env = (*KeelServer.unset_env, "RAY_ADDRESS")

    def replicas(self) -> list[int]:
        import psutil

        found = []
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if "ServeReplica:keel" in " ".join(child.cmdline()):
                    found.append(child.pid)
            except psutil.Error:
                pass
        return found

    def stop(self) -> None:
        try:
            super().stop()
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def kill_under_load(server: RayServer, route: str, concurrency: int, before_s: float, after_s: float) -> dict:
    """``concurrency`` clients on ``server``; one replica SIGKILLed after ``before_s``; every request logged."""
    log: list[tuple[float, float, object]] = []
    stop = asyncio.Event()

    host, port = server.url.removeprefix("http://").split(":")

    async def client(i: int):
        # the keep-alive client of the rounds (httpx set the pace there), reconnecting after a failed request
        reader = writer = None
        n = 0
        while not stop.is_set():
            start = time.monotonic()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, int(port))
                body = json.dumps({"input": text(i * 1000 + n)}).encode()
                writer.write(
                    f"POST /v1/{route} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                length = next(int(h.split(":", 1)[1]) for h in head if h.lower().startswith("content-length:"))
                await reader.readexactly(length)
                outcome = int(head[0].split()[1])
                if any(h.lower().replace(" ", "") == "connection:close" for h in head):  # as an HTTP client does
                    writer.close()
                    reader = writer = None
            except (OSError, asyncio.IncompleteReadError, StopIteration) as e:
                outcome = type(e).__name__
                if writer is not None:
                    writer.close()
                reader = writer = None
            log.append((start, time.monotonic(), outcome))
            n += 1
        if writer is not None:
            writer.close()

    replicas = server.replicas()
    tasks = asyncio.gather(*(client(i) for i in range(concurrency)))
    t0 = time.monotonic()
    await asyncio.sleep(before_s)
    killed_at = time.monotonic()
    os.kill(replicas[0], signal.SIGKILL)
    replaced_at = None
    while time.monotonic() - killed_at < 300:
        now = server.replicas()
        if len(now) == len(replicas) and replicas[0] not in now:
            replaced_at = time.monotonic()
            break
        await asyncio.sleep(0.25)
    # Ray routes to the new replica once it has loaded and warmed up: wait for /health/ready answers to settle
    await asyncio.sleep(after_s)
    stop.set()
    await tasks
    end = time.monotonic()
    failed = [(s - killed_at, o) for s, e, o in log if o != 200]

    def rate(lo: float, hi: float) -> float:
        done = sum(1 for s, e, o in log if lo <= e < hi and o == 200)
        return round(done / (hi - lo), 1) if hi > lo else float("nan")

    replaced = replaced_at or end
    return {
        "replicas": len(replicas),
        "requests": len(log),
        "in_flight_at_kill": sum(1 for s, e, _ in log if s <= killed_at < e),
        "failed": len(failed),
        "failed_sent_after_kill": sum(1 for dt, _ in failed if dt > 0),
        "failure_kinds": sorted({str(o) for _, o in failed}),
        "replacement_process_s": round(replaced - killed_at, 1) if replaced_at else None,
        "requests_per_s_before_kill": rate(t0 + 1, killed_at),
        "requests_per_s_until_replaced": rate(killed_at, replaced),
        "requests_per_s_after": rate(replaced + after_s / 2, end),
        "p95_ms_around_kill": round(
            percentile([e - s for s, e, o in log if killed_at - 1 <= s <= killed_at + 5 and o == 200], 0.95) * 1e3, 1
        ),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="minilm-l6", help="a run directory or model name")
    p.add_argument("--route", default="embeddings", choices=["embeddings", "classify"])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="serve.num_threads in every server and replica")
    args = p.parse_args()
    common = [f"serve.num_threads={args.threads}", "serve.max_queue=4096", f"serve.max_batch_size={args.concurrency}"]
    servers: dict = {}
    try:
        servers["keel serve"] = KeelServer(args.target, *common)
        for n in (1, 2):
            servers[f"ray serve x{n}"] = RayServer(
                args.target,
                *common,
                f"serve.ray.min_replicas={n}",
                f"serve.ray.max_replicas={n}",
                "serve.ray.num_cpus=1",
                f"serve.ray.max_ongoing_requests={args.concurrency}",
                "serve.drain_timeout=5",
            )
        rows: dict[str, list[dict]] = {name: [] for name in servers}
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for name in order:
                row = asyncio.run(load(servers[name].url, args.route, args.requests, args.concurrency))
                rows[name].append(row)
                print(
                    f"round {r + 1} {name:13s} {row['requests_per_s']:7.1f} req/s  p50 {row['p50_ms']:7.1f} ms  "
                    f"p95 {row['p95_ms']:7.1f} ms  ok {row['ok']}/{row['requests']}",
                    flush=True,
                )
        kill = asyncio.run(kill_under_load(servers["ray serve x2"], args.route, args.concurrency, 15.0, 20.0))
        print("replica kill:", kill, flush=True)
    finally:
        for server in servers.values():
            server.stop()
    base = rows["keel serve"]
    ratios = {
        name: [round(row["requests_per_s"] / b["requests_per_s"], 3) for row, b in zip(rows[name], base)]
        for name in rows
        if name != "keel serve"
    }
    for name, values in ratios.items():
        print(f"{name}: {values} x the requests/s of one keel serve (per round)")
    import torch

    device = "gpu" if torch.cuda.is_available() else "cpu"
    write_result(
        f"ray-serve-{device}",
        {
            "benchmark": "ray_serve",
            "target": args.target,
            "route": args.route,
            "concurrency": args.concurrency,
            "requests_per_round": args.requests,
            "device": device,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "load_average_at_end": os.getloadavg(),
            "rows": rows,
            "requests_per_s_ratio_vs_keel_serve": ratios,
            "replica_kill": kill,
        },
    )


if __name__ == "__main__":
    main()
