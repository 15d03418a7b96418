"""SmolLM2-135M: torchao weight-only int8 (and int4 where torchao has kernels for the device) vs fp32.

Perplexity on held-out Shakespeare (keel's own causal-LM test split), weight bytes of the Linear layers, and
greedy generation speed. Target: int8 perplexity within 2% of fp32. Writes benchmarks/results/lm-int8-cpu.json.

    .venv/bin/python benchmarks/lm_int8.py                 # 32 test blocks of 256 tokens
    .venv/bin/python benchmarks/lm_int8.py --blocks 64
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).parent / "results"


def linear_weight_bytes(model) -> int:
    """Bytes of the Linear weights as stored (quantized tensors count their int data and scales)."""
    import torch

    total = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            w = m.weight
            inner = [
                getattr(w, a)
                for a in ("qdata", "int_data", "packed_weight", "scale", "zero_point")
                if isinstance(getattr(w, a, None), torch.Tensor)
            ]
            if not inner and hasattr(w, "__tensor_flatten__"):
                names, _ = w.__tensor_flatten__()
                inner = [getattr(w, n) for n in names]
            total += sum(t.numel() * t.element_size() for t in inner) if inner else w.numel() * w.element_size()
    return total


def main() -> dict:
    import torch
    from transformers import AutoTokenizer

    import keel  # noqa: F401  (quiets torchao's import-time notes)
    from keel.data.prepare import prepare_data
    from keel.models import model_dir
    from keel.recipe import validate_recipe
    from keel.tasks import causal_lm

    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    args = ap.parse_args()

    recipe = validate_recipe(
        {
            "name": "lm-int8",
            "task": "causal-lm",
            "model": {"name": "smollm2-135m", "max_length": 256},
            "data": {"name": "shakespeare", "max_eval_samples": args.blocks},
        }
    )
    path = model_dir("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    test = prepare_data(recipe, tok).splits["test"]
    fp32 = causal_lm.build_model(path, []).eval()
    prompt = tok("ROMEO:\nBut soft, what light", return_tensors="pt")

    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    # int4 needs bf16 weights and, in recent torchao, CUDA kernels: on a CPU its row records why it could not run
    variants = {
        "fp32": lambda m: m,
        "int8-weight-only": lambda m: (quantize_(m, Int8WeightOnlyConfig()), m)[1],
        "int4-weight-only": lambda m: (quantize_(m.to(torch.bfloat16), Int4WeightOnlyConfig(group_size=64)), m)[1],
    }
    rows = []
    for name, make in variants.items():
        try:
            model = make(copy.deepcopy(fp32))
            t0 = time.perf_counter()
            res = causal_lm.evaluate(model, test, tok, 4, torch.device("cpu"))
            eval_s = time.perf_counter() - t0
            with torch.no_grad():
                model.generate(**prompt, max_new_tokens=4, do_sample=False)  # warm-up
                t0 = time.perf_counter()
                out = model.generate(
                    **prompt, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.eos_token_id
                )
                gen_s = time.perf_counter() - t0
            new = out.shape[1] - prompt["input_ids"].shape[1]
            rows.append(
                {
                    "variant": name,
                    "perplexity": res["perplexity"],
                    "linear_weight_mb": linear_weight_bytes(model) / 1e6,
                    "eval_seconds": round(eval_s, 1),
                    "tokens_per_second": new / gen_s,
                    "sample": tok.decode(out[0, prompt["input_ids"].shape[1] :])[:120],
                }
            )
        except Exception as e:  # a quantization this CPU cannot run is reported, not hidden
            rows.append({"variant": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        print(json.dumps(rows[-1]))
    base = rows[0]["perplexity"]
    for r in rows:
        if "perplexity" in r:
            r["perplexity_change_pct"] = (r["perplexity"] / base - 1) * 100
    print(f"\n{'variant':18} {'ppl':>8} {'vs fp32':>8} {'Linear MB':>10} {'tok/s':>7}")
    for r in rows:
        if "perplexity" in r:
            print(
                f"{r['variant']:18} {r['perplexity']:8.2f} {r['perplexity_change_pct']:+7.2f}% {r['linear_weight_mb']:10.1f} "
                f"{r['tokens_per_second']:7.1f}"
            )
        else:
            print(f"{r['variant']:18} failed: {r['error']}")
    result = {
        "command": f"python benchmarks/lm_int8.py --blocks {args.blocks}",
        "test_blocks": len(test),
        "block_tokens": 256,
        "target_int8_perplexity_within_pct": 2.0,
        "variants": rows,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lm-int8-cpu.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'lm-int8-cpu.json'}")
    return result


if __name__ == "__main__":
    main()
