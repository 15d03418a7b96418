"""Continuous batching vs sequential `generate` calls: aggregate new tokens/s with 16 concurrent streams.

    python benchmarks/serve_generation.py                       # smollm2-135m on CPU, 16 streams x 64 tokens
    python benchmarks/serve_generation.py --model tiny-llama --streams 16 --tokens 64

Baseline: HF `model.generate` (greedy) called once per prompt, one after another, in this process.
Ours: the same prompts as 16 concurrent streaming /v1/completions requests against `keel serve MODEL`
(greedy); tokens counted from the streams' usage. Prints a table and writes
benchmarks/results/serve-generation-<device>.json. Target on CPU: >= 5x aggregate tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import httpx
from serve_common import OFFLINE, KeelServer, percentile, write_result

TOPICS = [
    "the sea",
    "a long train journey",
    "the first snow of winter",
    "a market at dawn",
    "an old lighthouse",
    "a chess game",
    "learning to sail",
    "a quiet library",
    "the city at night",
    "a mountain village",
    "a broken clock",
    "the last day of summer",
    "a letter from a friend",
    "a garden in spring",
    "a storm at sea",
    "a forgotten song",
]


def prompts(n: int) -> list[str]:
    return [f"Write a short story about {TOPICS[i % len(TOPICS)]}. Once upon a time," for i in range(n)]


def sequential_generate(
    model_name: str, texts: list[str], tokens: int, threads: int | None, static_cache: bool = False
) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from keel.models.registry import model_dir

    if threads:
        torch.set_num_threads(threads)
    folder = model_dir(model_name)
    tok = AutoTokenizer.from_pretrained(folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # as keel serve: bf16 on a GPU, fp32 on a CPU
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    extra = {"cache_implementation": "static"} if static_cache else {}
    with torch.inference_mode():
        for _ in range(2 if static_cache else 1):  # the static cache compiles on first use
            model.generate(
                **tok("warm up", return_tensors="pt").to(device), max_new_tokens=tokens, do_sample=False, **extra
            )
        new, t0 = 0, time.perf_counter()
        for text in texts:
            enc = tok(text, return_tensors="pt").to(device)
            out = model.generate(**enc, max_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id, **extra)
            new += out.shape[1] - enc["input_ids"].shape[1]
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    return {
        "new_tokens": new,
        "wall_s": wall,
        "tokens_per_s": new / wall,
        "cache": "static" if static_cache else "dynamic",
        "dtype": str(dtype).removeprefix("torch."),
    }


async def concurrent_streams(url: str, texts: list[str], tokens: int, timeout: float = 600) -> dict:
    ttft, totals = [], []

    async def one(http, text):
        body = {
            "prompt": text,
            "max_tokens": tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        t0 = time.perf_counter()
        first = None
        async with http.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if first is None and event.get("choices") and event["choices"][0]["text"]:
                    first = time.perf_counter() - t0
                if event.get("usage"):
                    totals.append(event["usage"]["completion_tokens"])
        ttft.append(first or float("nan"))

    async with httpx.AsyncClient(
        base_url=url, timeout=timeout, limits=httpx.Limits(max_connections=len(texts))
    ) as http:
        await one(http, "warm up")
        totals.clear(), ttft.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(one(http, t) for t in texts))
        wall = time.perf_counter() - t0
    return {
        "new_tokens": sum(totals),
        "wall_s": wall,
        "tokens_per_s": sum(totals) / wall,
        "ttft_p50_ms": percentile(ttft, 0.5) * 1e3,
        "ttft_p95_ms": percentile(ttft, 0.95) * 1e3,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch threads for both sides (serve.num_threads)")
    p.add_argument("--static-cache", action="store_true", help="also time HF generate with its static KV cache")
    args = p.parse_args()
    os.environ.update(OFFLINE)
    texts = prompts(args.streams)
    base = sequential_generate(args.model, texts, args.tokens, args.threads)
    static = sequential_generate(args.model, texts, args.tokens, args.threads, True) if args.static_cache else None
    if static:
        print(f"sequential generate, static cache {static['tokens_per_s']:8.1f} tok/s", flush=True)
    print(
        f"sequential generate  {base['tokens_per_s']:8.1f} tok/s  ({base['new_tokens']} tokens in {base['wall_s']:.1f} s)",
        flush=True,
    )
    sets = [f"serve.max_running={args.streams}", f"serve.max_tokens={max(args.tokens, 64)}"]
    sets += [f"serve.num_threads={args.threads}"] if args.threads else []
    server = KeelServer(args.model, *sets)
    try:
        ours = asyncio.run(concurrent_streams(server.url, texts, args.tokens))
    finally:
        server.stop()
    print(
        f"keel serve ({args.streams} streams) {ours['tokens_per_s']:8.1f} tok/s  ({ours['new_tokens']} tokens in "
        f"{ours['wall_s']:.1f} s, first token p50 {ours['ttft_p50_ms']:.0f} ms)"
    )
    speedup = ours["tokens_per_s"] / base["tokens_per_s"]
    print(f"continuous batching: {speedup:.2f}x aggregate tokens/s vs sequential generate (target >= 5x)")
    import torch

    device = "gpu" if torch.cuda.is_available() else "cpu"
    result = {
        "benchmark": "serve_generation",
        "model": args.model,
        "streams": args.streams,
        "max_new_tokens": args.tokens,
        "device": torch.cuda.get_device_name() if device == "gpu" else device,
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "sequential_generate": base,
        "sequential_generate_static_cache": static,
        "keel_serve": ours,
        "speedup_tokens_per_s": round(speedup, 3),
        "meets_target": speedup >= 5,
    }
    write_result(f"serve-generation-{device}" if device == "cpu" else f"serve-generation-gpu-s{args.streams}", result)


if __name__ == "__main__":
    main()
