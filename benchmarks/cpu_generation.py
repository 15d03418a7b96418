"""CPU generation: keel's own engine (fp32, int8, int4) against llama.cpp (Q8_0, Q4_K_M) for smollm2-135m, one table.

For each engine: new tokens/s at 1 stream and at 16 concurrent streams (64 new tokens each, greedy, streamed
through `keel serve`'s API), and held-out perplexity (the same 256-token blocks of keel's Shakespeare test split).
All servers stay up side by side and the rounds alternate between them, so a busy machine slows each alike; each
figure is the best of its rounds. "bare llama.cpp" is llama-cpp-python's own generate loop in this process, no
HTTP: the reference `keel serve --engine llama.cpp` is held to (goal: within 1.2x at one stream).

    python benchmarks/cpu_generation.py                         # 2 rounds, 4 blocks, every core
    python benchmarks/cpu_generation.py --rounds 3 --blocks 16 --threads 1

It used to stop short of its table: 16 perplexity blocks through torchao's CPU path (which dequantizes every weight at
every call) took most of an hour, and on a busy machine a 16-stream round at 2 threads ran past the client's 600 s
timeout. Now 4 blocks by default, a one-hour client timeout, and `--threads 1` for a machine shared with others
(there, OpenMP barriers at 2 threads made a smollm2 decode step 4x slower at batch 1 and 16x at batch 16).

Needs `make llama`. The GGUF exports are made once into keel's cache (with their parity check) and reused.
Writes benchmarks/results/cpu-generation-cpu.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time

from serve_common import OFFLINE, KeelServer, write_result
from serve_generation import concurrent_streams, prompts

MODEL = "smollm2-135m"
# name -> (serve.backend, serve.decode): keel's own decode step (keel/serve/decode_step.py) wherever the model allows
# it (int8-dynamic's fbgemm layers do not: transformers' forward), and once transformers' forward for comparison
KEEL = {
    "keel fp32": ("torch", "auto"),
    "keel int8 weight-only (aten._weight_int8pack_mm)": ("int8-weight-only", "auto"),
    "keel int8 weight-only, transformers' forward": ("int8-weight-only", "transformers"),
    "keel int4 weight-only (aten._weight_int4pack_mm_for_cpu, int8 head)": ("int4-weight-only", "auto"),
    "keel int8 dynamic (fbgemm)": ("int8-dynamic", "auto"),
    "keel int8 (torchao weight-only)": ("torchao-weight-only", "auto"),
}
GGUF = {"llama.cpp Q8_0": "q8_0", "llama.cpp Q4_K_M": "q4_k_m"}


def heldout_blocks(n: int, tok) -> list[list[int]]:
    from keel.data.prepare import prepare_data
    from keel.recipe import validate_recipe

    recipe = validate_recipe(
        {
            "name": "cpu-generation",
            "task": "causal-lm",
            "model": {"name": MODEL, "max_length": 256},
            "data": {"name": "shakespeare", "max_eval_samples": n},
        }
    )
    return [list(r) for r in prepare_data(recipe, tok).splits["test"][:n]["input_ids"]]


def torch_perplexity(model, blocks) -> float:
    from keel.export.gguf import torch_figures

    return torch_figures(model, blocks, [], 0)["perplexity"]


def step_perplexity(model, blocks) -> float:
    """Held-out perplexity with every token after the first fed through keel's decode step (keel/serve/decode_step.py)
    and the scheduler's KV cache, as a served sequence is: the oracle for the step's own numerics (bfloat16
    activations round differently than in one forward pass over the block)."""
    import math

    import torch

    from keel.serve.decode_step import LlamaDecodeStep
    from keel.serve.scheduler import new_cache

    ids = torch.tensor(blocks)  # (B, T)
    B, T = ids.shape
    step, cache, nll = LlamaDecodeStep(model), new_cache(model.config), 0.0
    with torch.inference_mode():
        logits = model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True).logits[:, -1]  # (B, V)
        mask = torch.ones(B, 1, dtype=torch.long)
        for t in range(1, T):
            nll += torch.nn.functional.cross_entropy(logits.float(), ids[:, t], reduction="sum").item()
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)  # (B, t+1)
            logits = step(ids[:, t], torch.full((B,), t), mask, cache)
    return math.exp(nll / (B * (T - 1)))


def gguf_exports(blocks, tok, model) -> dict[str, dict]:
    """quant -> (folder, keel.json) of the smollm2 GGUF exports in keel's cache, made (and checked) once."""
    from keel.export.gguf import variant, write_export
    from keel.io import cache_dir
    from keel.models.registry import model_dir

    out = {}
    for quant in GGUF.values():
        folder = cache_dir() / "gguf-bench" / f"{MODEL}-{variant(quant)}"
        if not (folder / "manifest.json").is_file():
            print(f"exporting {MODEL} to GGUF {quant} (once)", flush=True)
            write_export(
                folder,
                model_dir(MODEL),
                model,
                tok,
                quant,
                blocks,
                "shakespeare test",
                blocks[:4],
                2048,
                {"model": MODEL},
            )
        out[quant] = {"folder": folder, "meta": json.loads((folder / "keel.json").read_text())}
    return out


TIMEOUT_S = 3600  # one round's client timeout: a 16-stream fp32 round on a busy machine runs for minutes


async def one_stream(url: str, text: str, tokens: int) -> dict:
    return await concurrent_streams(url, [text], tokens, timeout=TIMEOUT_S)


def bare_llama(folder, text: str, tokens: int, threads: int | None) -> dict:
    """llama-cpp-python's generate loop alone: prompt tokenized by llama.cpp, greedy, ``tokens`` new tokens."""
    from keel.export.gguf import open_gguf

    llm = open_gguf(folder / "model.gguf", 2048, threads=threads)
    # warmed up on another prompt, as each server is (a first pass faults the mapped weights in; the same prompt
    # would let llama.cpp reuse its cached prefix and skip the prefill that the served figures include)
    for n, _ in enumerate(llm.generate(llm.tokenize(b"warm up"), temp=0.0, top_k=1, repeat_penalty=1.0)):
        if n + 1 >= tokens:
            break
    ids = llm.tokenize(text.encode())
    n, t0 = 0, time.perf_counter()
    for _ in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        n += 1
        if n >= tokens:
            break
    wall = time.perf_counter() - t0
    llm.close()
    return {"new_tokens": n, "wall_s": wall, "tokens_per_s": n / wall}


def main() -> dict:
    import torch
    from transformers import AutoTokenizer

    from keel.models.registry import model_dir
    from keel.serve.lm_int8 import quantize_lm
    from keel.tasks import causal_lm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument(
        "--skip-serving",
        default="torchao-weight-only",
        help="keel backends measured for perplexity only (comma-separated; torchao's CPU path is the slowest)",
    )
    args = ap.parse_args()
    os.environ.update(OFFLINE)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    path = model_dir(MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    blocks = heldout_blocks(args.blocks, tok)
    fp32 = causal_lm.build_model(path, []).eval()
    ppl = {"keel fp32": torch_perplexity(fp32, blocks)}
    exports = gguf_exports(blocks, tok, fp32)
    import copy

    from keel.serve.decode_step import supports

    step_ppl = {}  # backend -> perplexity through keel's decode step, where the model allows it
    for name, (backend, decode) in KEEL.items():  # perplexity: transformers' forward over each block
        same = [n for n, (b, _) in KEEL.items() if b == backend and n in ppl]
        model = fp32 if backend == "torch" else quantize_lm(copy.deepcopy(fp32), backend)
        ppl[name] = ppl[same[0]] if same else torch_perplexity(model, blocks)
        if decode != "transformers" and backend not in step_ppl and supports(model) is None:
            step_ppl[backend] = step_perplexity(model, blocks)
    for name, quant in GGUF.items():
        ppl[name] = exports[quant]["meta"]["parity"]["perplexity_gguf"]
    del fp32

    sets = [f"serve.num_threads={args.threads}", f"serve.max_tokens={args.tokens}", "serve.timeout_s=3600"]
    servers = {}
    try:
        for name, (backend, decode) in KEEL.items():
            if backend not in args.skip_serving.split(","):
                servers[name] = KeelServer(MODEL, *sets, f"serve.backend={backend}", f"serve.decode={decode}")
        for name, quant in GGUF.items():
            servers[name] = KeelServer(str(exports[quant]["folder"]), *sets, "serve.engine=llama.cpp")
        texts = prompts(args.streams)
        rows: dict[str, dict] = {name: {"one": [], "many": []} for name in servers}
        bare: dict[str, list] = {name: [] for name in GGUF}
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for name in order:
                url = servers[name].url
                rows[name]["one"].append(asyncio.run(one_stream(url, texts[0], args.tokens)))
                rows[name]["many"].append(asyncio.run(concurrent_streams(url, texts, args.tokens, timeout=TIMEOUT_S)))
                print(
                    f"round {r + 1} {name}: 1 stream {rows[name]['one'][-1]['tokens_per_s']:.1f} tok/s, "
                    f"{args.streams} streams {rows[name]['many'][-1]['tokens_per_s']:.1f} tok/s",
                    flush=True,
                )
            for name, quant in GGUF.items():
                bare[name].append(bare_llama(exports[quant]["folder"], texts[0], args.tokens, args.threads))
                print(f"round {r + 1} bare {name}: {bare[name][-1]['tokens_per_s']:.1f} tok/s", flush=True)
    finally:
        for s in servers.values():
            s.stop()

    table = []
    for name in KEEL:
        if name not in servers:
            table.append({"engine": name, "heldout_perplexity": ppl[name], "served": False})
    for name in servers:
        one = max(x["tokens_per_s"] for x in rows[name]["one"])
        many = max(x["tokens_per_s"] for x in rows[name]["many"])
        table.append(
            {
                "engine": name,
                "tokens_per_s_1_stream": one,
                f"tokens_per_s_{args.streams}_streams": many,
                "heldout_perplexity": ppl[name],
                "heldout_perplexity_through_decode_step": step_ppl.get(KEEL[name][0])
                if name in KEEL and KEEL[name][1] != "transformers"
                else None,
                "rounds": rows[name],
            }
        )
    for name in GGUF:
        table.append(
            {
                "engine": f"bare {name} (llama-cpp-python, no HTTP)",
                "tokens_per_s_1_stream": max(x["tokens_per_s"] for x in bare[name]),
                "heldout_perplexity": ppl[name],
                "rounds": bare[name],
            }
        )
    print(f"\n{'engine':<70} {'1 stream':>10} {f'{args.streams} streams':>11} {'perplexity':>11}")
    for row in table:
        many, one = row.get(f"tokens_per_s_{args.streams}_streams"), row.get("tokens_per_s_1_stream")
        print(
            f"{row['engine']:<70} {(f'{one:.1f}' if one else '-'):>10} "
            f"{(f'{many:.1f}' if many else '-'):>11} {row['heldout_perplexity']:>11.3f}"
        )
    result = {
        "command": f"python benchmarks/cpu_generation.py --rounds {args.rounds} --threads {args.threads} "
        f"--blocks {args.blocks}",
        "model": MODEL,
        "new_tokens": args.tokens,
        "streams": args.streams,
        "heldout": f"{len(blocks)} blocks of 256 tokens, Shakespeare test split",
        "gguf_parity": {q: e["meta"]["parity"] for q, e in exports.items()},
        "table": table,
        "load_average_1_5_15_min": {"start": load_before, "end": os.getloadavg()},
        "threads": args.threads,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
    }
    write_result("cpu-generation-cpu", result)
    return result


if __name__ == "__main__":
    main()
