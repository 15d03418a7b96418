"""keel's continuous-batching scheduler vs transformers' own (`generate_batch`), in-process, same model and prompts.

    python benchmarks/serve_cb_vs_transformers.py [--model tiny-llama] [--streams 16] [--tokens 64]

Why keel serve has its own scheduler: this is the measurement behind that choice. Greedy, EOS disabled on both
sides, so both generate streams x tokens. Writes benchmarks/results/serve-cb-vs-transformers-<device>.json.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from serve_common import decode_all, write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from keel.models.registry import model_dir

    folder = model_dir(args.model)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompts = [tok(f"Write a short story about topic {i}. Once upon a time,")["input_ids"] for i in range(args.streams)]

    keel_s, outputs = decode_all(model, tok, prompts, args.tokens)
    keel_tokens = sum(map(len, outputs))

    config = GenerationConfig(max_new_tokens=args.tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    t0 = time.perf_counter()
    out = model.generate_batch(inputs=prompts, generation_config=config)  # fails inside torch.inference_mode()
    hf_s = time.perf_counter() - t0
    hf_tokens = sum(len(o.generated_tokens) for o in out.values())

    rows = {
        "keel_scheduler": {"tokens": keel_tokens, "wall_s": keel_s, "tokens_per_s": keel_tokens / keel_s},
        "transformers_generate_batch": {"tokens": hf_tokens, "wall_s": hf_s, "tokens_per_s": hf_tokens / hf_s},
    }
    for name, r in rows.items():
        print(f"{name:30s} {r['tokens_per_s']:9.1f} tok/s  ({r['tokens']} tokens in {r['wall_s']:.2f} s)")
    device = "gpu" if torch.cuda.is_available() else "cpu"
    write_result(
        f"serve-cb-vs-transformers-{device}",
        {
            "benchmark": "serve_cb_vs_transformers",
            "model": args.model,
            "streams": args.streams,
            "max_new_tokens": args.tokens,
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "device": device,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
