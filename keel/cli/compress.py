"""Export, bench and the compression verbs: each stage alone, or all of them with the budgeted pick."""

from __future__ import annotations

import typer

from keel.cli._app import app
from keel.progress import esc, out


@app.command()
def export(
    run_dir: str = typer.Argument(..., help="a run directory"),
    int8: bool = typer.Option(True, "--int8/--no-int8", help="also write an int8 ONNX Runtime model"),
    target: str = typer.Option(
        "onnx",
        help="onnx (keel's runtime), web (a Transformers.js folder + demo page), mobile (ORT format) or gguf "
        "(a causal LM for llama.cpp; `make llama`)",
    ),
    quant: str = typer.Option("f16", help="--target gguf: f16, q8_0 or q4_k_m"),
) -> None:
    """Export a classifier to ONNX (checked against PyTorch) and int8 for ONNX Runtime; or a causal LM to GGUF."""
    if target == "gguf":
        return _export_gguf(run_dir, quant)
    if target != "onnx":
        from keel.cli.edge import export_edge

        return export_edge(run_dir, target)
    from keel.export.onnx import FP32, INT8, export_dir, export_onnx

    result = export_onnx(run_dir, int8=int8)
    out.print(
        f"{esc(export_dir(run_dir, FP32))}: {result[FP32]['bytes'] / 1e6:.1f} MB, "
        f"max |logit diff| vs PyTorch {result[FP32]['max_abs_diff_vs_eager']:.1e}"
    )
    if INT8 in result:
        out.print(
            f"{esc(export_dir(run_dir, INT8))}: {result[INT8]['bytes'] / 1e6:.1f} MB, "
            f"logit cosine vs PyTorch {result[INT8]['logit_cosine_vs_eager']:.4f}"
        )
    out.print(f"next: keel eval {esc(run_dir)} --backend onnx-int8")


def _export_gguf(run_dir: str, quant: str) -> None:
    from keel.export.gguf import check_quant, export_gguf, variant
    from keel.rundir import export_dir

    meta = export_gguf(run_dir, check_quant(quant))
    p = meta["parity"]
    out.print(
        f"{esc(export_dir(run_dir, variant(quant)))}: {meta['bytes'] / 1e6:.1f} MB; held-out perplexity "
        f"{p['perplexity_gguf']:.3f} in llama.cpp vs {p['perplexity_torch']:.3f} in PyTorch ({p['heldout']}, "
        f"{p['heldout_tokens']} tokens); greedy continuations equal {p['greedy_exact']}/{p['greedy_prompts']}"
    )
    out.print(f"next: keel serve {esc(run_dir)} --engine llama.cpp")


@app.command()
def bench(
    run_dir: str = typer.Argument(..., help="a run directory"),
    n_latency: int = typer.Option(100, help="texts timed one by one for the batch-1 latency"),
    n_eval: int = typer.Option(1000, help="validation examples scored (and timed at batch 32)"),
    rounds: int = typer.Option(
        3, min=1, max=10, help="measure every variant this many times, taking turns; ratios: median of the rounds"
    ),
) -> None:
    """Measure every variant of a run's model (HF pipeline baseline, PyTorch, ONNX, int8, compressed) side by side."""
    from keel.export.bench import bench as _bench
    from keel.report import write_report

    _print_bench(_bench(run_dir, n_latency, n_eval, rounds=rounds))
    out.print(
        f"ratios vs the fp32 teacher through transformers' pipeline; wrote {esc(run_dir)}/bench.json and "
        f"{esc(write_report(run_dir))}"
    )


COMPRESS_OVERRIDES = typer.Argument(
    None, help="compress.* overrides, e.g. compress.distill.layers=3 compress.prune.ffn=0.5"
)


@app.command()
def distill(
    run_dir: str = typer.Argument(..., help="a run directory (its model is the teacher)"),
    overrides: list[str] | None = COMPRESS_OVERRIDES,
) -> None:
    """Distill the run's model into a smaller student (RUN_DIR/compress/student)."""
    from keel.compress.stages import distill as _distill
    from keel.compress.stages import run_recipe

    folder = _distill(run_dir, run_recipe(run_dir, overrides))
    out.print(f"student: [bold]{esc(folder)}[/]   next: keel eval {esc(run_dir)} --backend student-torch")


@app.command()
def prune(
    run_dir: str = typer.Argument(..., help="a run directory"), overrides: list[str] | None = COMPRESS_OVERRIDES
) -> None:
    """Prune the latest model (student, else teacher): heads/FFN neurons (structured) or weights (sparsity)."""
    from keel.compress.stages import prune as _prune
    from keel.compress.stages import run_recipe

    folder = _prune(run_dir, run_recipe(run_dir, overrides))
    out.print(f"pruned: [bold]{esc(folder)}[/]   next: keel eval {esc(run_dir)} --backend pruned-torch")


@app.command()
def quantize(
    run_dir: str = typer.Argument(..., help="a run directory"),
    overrides: list[str] | None = COMPRESS_OVERRIDES,
    stage: str | None = typer.Option(None, help="teacher, student or pruned (default: the latest)"),
) -> None:
    """ONNX export + int8 (dynamic, and static when asked) of the latest model; torchao int8 when asked."""
    from keel.compress.stages import quantize as _quantize
    from keel.compress.stages import run_recipe

    for variant in _quantize(run_dir, run_recipe(run_dir, overrides), stage):
        out.print(f"  {variant}   (keel eval {esc(run_dir)} --backend {variant})")


@app.command()
def compress(
    run_dir: str = typer.Argument(..., help="a run directory"), overrides: list[str] | None = COMPRESS_OVERRIDES
) -> None:
    """Every stage in the recipe's compress section, the bench, and the deployable pick within compress.budget."""
    from keel.compress.stages import compress as _compress
    from keel.report import write_report

    try:
        record = _compress(run_dir, overrides)
    finally:
        from pathlib import Path

        if (Path(run_dir) / "bench.json").is_file():
            import json as _json

            _print_bench(_json.loads((Path(run_dir) / "bench.json").read_text()))
            write_report(run_dir)
    out.print(
        f'deployable: [bold]{record["deployable"]}[/]   (keel predict {esc(run_dir)} --backend {record["deployable"]} "...")'
    )


def _print_bench(result: dict) -> None:
    from rich.table import Column, Table

    names = [r["variant"] for r in result["variants"]]
    split = result.get("split", "test")  # benches written before the validation pick scored the test split
    table = Table(
        Column("variant", no_wrap=True, min_width=max(map(len, names))),
        f"{split} accuracy",
        "macro-F1",
        "MB on disk",
        "p50 ms (b=1)",
        "p95 ms (b=1)",
        "samples/s (b=32)",
        "peak RSS MB",
        "x faster p50",
        "x throughput",
        "x throughput, length-sorted",
        "x smaller",
    )
    for r in result["variants"]:
        table.add_row(
            r["variant"],
            f"{r['accuracy']:.4f}",
            f"{r['macro_f1']:.4f}",
            f"{r['disk_mb']:.1f}",
            f"{r['p50_ms_batch1']:.2f}",
            f"{r['p95_ms_batch1']:.2f}",
            f"{r['throughput_batch32']:.1f}",
            f"{r['peak_rss_mb']:.0f}",
            _ratio(r, "speedup_p50_vs_pipeline"),
            _ratio(r, "throughput_vs_pipeline"),
            _ratio(r, "throughput_sorted_vs_pipeline"),
            f"{r['smaller_vs_pipeline']:.2f}",
        )
    out.print(table)
    out.print(
        "throughput: the same batches of 32 for every variant and the pipeline, in the split's order; "
        "length-sorted: the same batches of similar-length texts for all of them"
        + (
            f"; ratios: the median of {result['rounds']} rounds' (lowest-highest), each against that round's pipeline"
            if result.get("rounds", 1) > 1
            else ""
        )
    )


def _ratio(row: dict, name: str) -> str:
    """``8.12`` or, measured in rounds, ``8.12 (7.60-8.55)``; nan for a bench.json written before the figure."""
    text = f"{row.get(name, float('nan')):.2f}"
    spread = row.get(f"{name}_range")
    return text + (f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread and spread[0] != spread[1] else "")
