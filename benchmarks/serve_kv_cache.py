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
import os
import platform

import torch
from serve_common import decode_all, write_result
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from keel.models.registry import model_dir
from keel.serve import scheduler as S

WORDS = "the sea and the ships in the harbour at night under a quiet sky with the lights of the town".split()


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
        prompts = [
            tok(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(words + i)))["input_ids"]
            for i in range(args.streams)
        ]
        best, outputs = {}, {}
        for _ in range(args.rounds):
            for name, factory in (("DynamicLayer", plain), ("GrowingLayer", growing)):
                S.new_cache = factory
                seconds, outputs[name] = decode_all(model, tok, prompts, new_tokens, device)
                best[name] = max(best.get(name, 0.0), len(prompts) * new_tokens / seconds)
        S.new_cache = growing
        if outputs["DynamicLayer"] != outputs["GrowingLayer"]:
            raise SystemExit("the two caches decoded different tokens")
        row = {
            "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts),
            "new_tokens": new_tokens,
            "streams": args.streams,
            "tokens_per_s": {k: round(v, 1) for k, v in best.items()},
            "speedup": round(best["GrowingLayer"] / best["DynamicLayer"], 3),
        }
        rows.append(row)
        print(
            f"prompt ~{row['prompt_tokens_mean']:.0f} tokens, {new_tokens} new x {args.streams} streams: "
            f"DynamicLayer {best['DynamicLayer']:.1f} tok/s, GrowingLayer {best['GrowingLayer']:.1f} tok/s "
            f"({row['speedup']:.2f}x)",
            flush=True,
        )
    result = {
        "benchmark": "serve_kv_cache",
        "model": args.model,
        "device": device,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "rounds": args.rounds,
        "rows": rows,
    }
    write_result(f"serve-kv-cache-{device}", result)


if __name__ == "__main__":
    main()
