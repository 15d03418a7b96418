"""The continuous-batching scheduler's KV cache: transformers' DynamicLayer (one torch.cat of the whole cache per
decode step and layer) against keel's GrowingLayer (the new token written in place into a buffer with room).

    python benchmarks/serve_kv_cache.py                 # smollm2-135m, 16 streams, short and long prompts
    python benchmarks/serve_kv_cache.py --rounds 3 --streams 8

The same scheduler, prompts and greedy decoding in this process; only the cache layer differs (the outputs are
checked to be identical). Aggregate new tokens/s, best of --rounds, the two caches measured alternately.
Prints a table and writes benchmarks/results/serve-kv-cache-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from keel.models.registry import model_dir
from keel.serve import scheduler as S

RESULTS = Path(__file__).parent / "results"
WORDS = "the sea and the ships in the harbour at night under a quiet sky with the lights of the town".split()


def run(model, tok, prompts: list[list[int]], new_tokens: int, device: str) -> tuple[float, list[list[int]]]:
    done, lock = {}, threading.Lock()

    def emit(index, kind, payload):
        if kind in ("done", "error"):
            with lock:
                done[index] = payload

    sched = S.Scheduler(model, tok, max_running=len(prompts), device=device)
    sched.eos = set()  # every stream runs to its full length
    seqs = [S.Sequence(p, new_tokens, temperature=0.0, index=i, emit=emit) for i, p in enumerate(prompts)]
    sched.start()
    t0 = time.perf_counter()
    sched.submit(seqs)
    while len(done) < len(seqs):
        time.sleep(0.005)
    wall = time.perf_counter() - t0
    sched.stop()
    if any("error" in d or not isinstance(d, dict) for d in done.values()):
        raise SystemExit(f"generation failed: {done}")
    return len(seqs) * new_tokens / wall, [s.out_ids for s in seqs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    path = model_dir(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    growing = S.new_cache

    def plain(config):
        return DynamicCache(config=config)

    rows = []
    for words, new_tokens in [(10, 64), (200, 128)]:  # (prompt words, new tokens per stream)
        prompts = [tok(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(words + i)))["input_ids"]
                   for i in range(args.streams)]
        best, outputs = {}, {}
        for _ in range(args.rounds):
            for name, factory in (("DynamicLayer", plain), ("GrowingLayer", growing)):
                S.new_cache = factory
                rate, outputs[name] = run(model, tok, prompts, new_tokens, device)
                best[name] = max(best.get(name, 0.0), rate)
        S.new_cache = growing
        if outputs["DynamicLayer"] != outputs["GrowingLayer"]:
            raise SystemExit("the two caches decoded different tokens")
        row = {"prompt_tokens_mean": sum(map(len, prompts)) / len(prompts), "new_tokens": new_tokens,
               "streams": args.streams, "tokens_per_s": {k: round(v, 1) for k, v in best.items()},
               "speedup": round(best["GrowingLayer"] / best["DynamicLayer"], 3)}
        rows.append(row)
        print(f"prompt ~{row['prompt_tokens_mean']:.0f} tokens, {new_tokens} new x {args.streams} streams: "
              f"DynamicLayer {best['DynamicLayer']:.1f} tok/s, GrowingLayer {best['GrowingLayer']:.1f} tok/s "
              f"({row['speedup']:.2f}x)", flush=True)
    result = {"benchmark": "serve_kv_cache", "model": args.model, "device": device, "threads": args.threads,
              "cpu_count": os.cpu_count(), "machine": platform.machine(), "rounds": args.rounds, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"serve-kv-cache-{device}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
