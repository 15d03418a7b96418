"""GGUF export of a run's causal LM with llama.cpp's own tools, checked against PyTorch through llama-cpp-python.

    runs/<name>/export/gguf-f16/      model.gguf (f16), the tokenizer, keel.json (parity figures), manifest.json
    runs/<name>/export/gguf-q8_0/     the same, weights Q8_0
    runs/<name>/export/gguf-q4_k_m/   the same, weights Q4_K_M

f16 comes straight from llama.cpp's converter (``convert_hf_to_gguf.py``); Q8_0 and Q4_K_M are quantized by
llama.cpp's quantizer (``llama_model_quantize``, what ``llama-quantize`` runs) from an f32 GGUF, so rounding
happens once. Both tools come from the llama-cpp-python sdist (`keel.export.llama_tools`, ``make llama``).

The parity check runs the GGUF model in llama.cpp and the PyTorch model on the same held-out token blocks (the
run's test split) and prompts: perplexity of both, and greedy continuations (how many match token for token,
and their mean common prefix). The figures are written to keel.json and returned; a GGUF whose perplexity is
off by more than ``max_ppl_ratio`` (llama.cpp reads the tensors wrongly, or the tokenizer differs) is not kept.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from keel.errors import KeelError
from keel.export import llama_tools
from keel.io import atomic_dir, writes_run
from keel.rundir import export_dir

logger = logging.getLogger(__name__)

QUANTS = ("f16", "q8_0", "q4_k_m")
FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
# Allowed perplexity ratio GGUF / PyTorch on the held-out blocks. Q4_K_M costs a 135M model a few percent.
MAX_PPL_RATIO = {"f16": 1.02, "q8_0": 1.05, "q4_k_m": 1.5}
FALLBACK_TEXTS = [
    "The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and the clocks were striking.",
    "Once upon a time there was a small village at the edge of a forest, where every child knew the old stories.",
]


def variant(quant: str) -> str:
    return f"gguf-{quant}"


def check_quant(quant: str) -> str:
    if quant not in QUANTS:
        raise KeelError(f"--quant must be one of {', '.join(QUANTS)}; got {quant!r}")
    return quant


def convert(model_dir: Path, out: Path, outtype: str = "f16", timeout: float = 1800) -> Path:
    """llama.cpp's converter on a Hugging Face folder -> ``out`` (f32, f16, bf16 or q8_0); its own process."""
    converter = llama_tools.require_converter()
    cmd = [sys.executable, "-m", "keel.export.gguf_convert", str(converter), str(model_dir), str(out), outtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.is_file():
        lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        logger.debug("llama.cpp's converter said:\n%s", proc.stderr)
        raise KeelError(
            f"llama.cpp's converter could not convert {model_dir} ({lines[-1] if lines else f'exit {proc.returncode}'})"
            "; its architecture or tokenizer may be one llama.cpp does not support (see --debug)"
        )
    return out


def quantize(src: Path, dst: Path, quant: str) -> Path:
    """llama.cpp's quantizer (the library call behind ``llama-quantize``): ``src`` GGUF -> ``dst`` in ``quant``."""
    llama = llama_tools.llama_cpp()
    params = llama.llama_model_quantize_default_params()
    params.ftype = getattr(llama, FTYPES[quant])
    params.nthread = os.cpu_count() or 1
    with _quiet_fds():  # the C library narrates every tensor on stdout/stderr
        rc = llama.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise KeelError(f"llama.cpp's quantizer failed on {src} ({quant}, code {rc})")
    return dst


@contextlib.contextmanager
def _quiet_fds():
    """File descriptors 1 and 2 to /dev/null for a C call (unless keel logs at debug level)."""
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1), os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def open_gguf(path: Path, n_ctx: int, threads: int | None = None, logits_all: bool = False):
    """A ``llama_cpp.Llama`` on ``path``, CPU, quiet."""
    llama = llama_tools.llama_cpp()
    return llama.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=min(n_ctx, 512),
        n_threads=threads or os.cpu_count(),
        logits_all=logits_all,
        verbose=False,
    )


def _nll(logits, ids) -> tuple[float, int]:
    """Summed next-token NLL of ``ids`` (T,) under ``logits`` (T, V), numpy, float64."""
    import numpy as np

    x = np.asarray(logits[: len(ids) - 1], dtype=np.float64)  # (T-1, V)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].sum()), len(ids) - 1


def torch_figures(model, blocks: list[list[int]], prompts: list[list[int]], n_new: int) -> dict:
    """PyTorch's perplexity on ``blocks`` and greedy continuations of ``prompts`` (the oracle)."""
    import torch

    total, n = 0.0, 0
    with torch.inference_mode():
        for ids in blocks:
            logits = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()  # (T, V)
            s, k = _nll(logits, ids)
            total, n = total + s, n + k
        outs = []
        for ids in prompts:
            gen = model.generate(
                torch.tensor([ids]), max_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=0
            )
            outs.append(gen[0, len(ids) :].tolist())
    return {"perplexity": math.exp(total / n), "tokens": n, "greedy": outs}


def llama_figures(path: Path, n_ctx: int, blocks: list[list[int]], prompts: list[list[int]], n_new: int) -> dict:
    """The same figures from llama.cpp on the GGUF file."""
    import numpy as np

    llm = open_gguf(path, n_ctx, logits_all=True)
    total, n = 0.0, 0
    for ids in blocks:
        llm.reset()
        llm.eval(ids)
        s, k = _nll(np.array(llm.scores[: len(ids)]), ids)
        total, n = total + s, n + k
    outs = []
    for ids in prompts:
        llm.reset()
        out = []
        for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(tok))
            if len(out) >= n_new:
                break
        outs.append(out)
    llm.close()
    return {"perplexity": math.exp(total / n), "tokens": n, "greedy": outs}


def compare(ref: dict, got: dict) -> dict:
    """Parity figures: perplexities, their ratio, greedy continuations that match exactly, mean common prefix."""

    def prefix(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    pairs = list(zip(ref["greedy"], got["greedy"]))
    return {
        "perplexity_torch": ref["perplexity"],
        "perplexity_gguf": got["perplexity"],
        "perplexity_ratio": got["perplexity"] / ref["perplexity"],
        "heldout_tokens": ref["tokens"],
        "greedy_exact": sum(a == b for a, b in pairs),
        "greedy_prompts": len(pairs),
        "greedy_mean_common_prefix": sum(prefix(a, b) for a, b in pairs) / max(1, len(pairs)),
        "greedy_new_tokens": max((len(a) for a in ref["greedy"]), default=0),
    }


def heldout(run_dir: Path, trained, n_blocks: int, block: int) -> tuple[list[list[int]], str]:
    """Token blocks of the run's test split (else validation), at most ``block`` tokens each; fixed texts if none."""
    tok = trained.tokenizer
    try:
        from keel.data.prepare import prepare_data

        data = prepare_data(trained.recipe, tok, run_dir)
        for split in ("test", "validation"):
            ds = data.splits.get(split)
            if ds is not None and len(ds) and "input_ids" in ds.column_names:
                rows = [list(r)[:block] for r in ds[:n_blocks]["input_ids"]]
                rows = [r for r in rows if len(r) > 1]
                if rows:
                    return rows, split
    except KeelError:
        pass
    return [tok(t)["input_ids"][:block] for t in FALLBACK_TEXTS], "fixed texts"


def parity(model, tokenizer, gguf: Path, blocks, prompts, n_ctx: int, n_new: int = 16) -> dict:
    """Both engines on the same blocks and prompts -> the compared figures (see ``compare``)."""
    ref = torch_figures(model, blocks, prompts, n_new)
    got = llama_figures(gguf, n_ctx, blocks, prompts, n_new)
    return compare(ref, got)


@writes_run
def export_gguf(run_dir: str | Path, quant: str = "f16", n_blocks: int = 16, n_prompts: int = 4) -> dict:
    """Export the run's final causal LM to ``export/gguf-<quant>/`` with the parity check; returns its keel.json."""
    from keel.runtime.load import load_trained
    from keel.secure.seal import is_sealed, refuse_plain_outputs

    check_quant(quant)
    run_dir = Path(run_dir)
    refuse_plain_outputs(run_dir, "export")
    t = load_trained(run_dir)
    if t.info["task"] != "causal-lm":
        raise KeelError(
            f"keel export --target gguf is for causal-lm runs (pretrained, SFT, aligned); {run_dir} is a "
            f"{t.info['task']} run: export it with `keel export {run_dir}` (ONNX)"
        )
    if is_sealed(run_dir / "model"):
        raise KeelError(f"{run_dir}'s model is sealed; `keel unseal {run_dir}` first (llama.cpp reads plain files)")
    llama_tools.llama_cpp()  # the parity check (and the quantizer) need it: fail before converting anything
    model = t.model.float().eval()
    n_ctx = min(int(getattr(model.config, "max_position_embeddings", 2048)), 2048)
    block = min(t.recipe.model.max_length, n_ctx)
    blocks, source = heldout(run_dir, t, n_blocks, block)
    prompts = [b[: max(2, min(16, len(b) // 2))] for b in blocks[:n_prompts]]
    final = export_dir(run_dir, variant(quant))
    return write_export(
        final, run_dir / "model", model, t.tokenizer, quant, blocks, source, prompts, n_ctx, t.info, run_dir
    )


def write_export(
    final: Path,
    model_dir: Path,
    model,
    tokenizer,
    quant: str,
    blocks: list[list[int]],
    source: str,
    prompts: list[list[int]],
    n_ctx: int,
    info: dict,
    scratch_parent: Path | None = None,
) -> dict:
    """Convert (and quantize) ``model_dir`` into the sealed folder ``final``: model.gguf, the tokenizer, keel.json
    with the parity figures. Nothing is written when the check fails. Returns keel.json."""
    start = time.perf_counter()
    with atomic_dir(final) as tmp, tempfile.TemporaryDirectory(dir=scratch_parent) as scratch:
        out = tmp / "model.gguf"
        if quant == "f16":
            convert(model_dir, out, "f16")
        else:
            quantize(convert(model_dir, Path(scratch) / "model-f32.gguf", "f32"), out, quant)
        figures = parity(model, tokenizer, out, blocks, prompts, n_ctx)
        figures["heldout"] = source
        limit = MAX_PPL_RATIO[quant]
        if not figures["perplexity_ratio"] <= limit:
            raise KeelError(
                f"the {quant} GGUF's held-out perplexity is {figures['perplexity_gguf']:.3f} against PyTorch's "
                f"{figures['perplexity_torch']:.3f} (ratio {figures['perplexity_ratio']:.3f} > {limit}); "
                "nothing was written: try --quant f16 or q8_0"
            )
        tokenizer.save_pretrained(tmp)  # keel serve --engine llama.cpp tokenizes as the PyTorch model does
        meta = {
            **info,
            "variant": variant(quant),
            "quant": quant,
            "format": "gguf",
            "bytes": out.stat().st_size,
            "n_ctx": n_ctx,
            "parity": figures,
            "seconds": time.perf_counter() - start,
        }
        (tmp / "keel.json").write_text(json.dumps(meta, indent=2))
    return meta


def gguf_variants(run_dir: str | Path) -> list[str]:
    """The GGUF exports a run has, in ``QUANTS`` order."""
    return [variant(q) for q in QUANTS if (export_dir(run_dir, variant(q)) / "manifest.json").is_file()]
