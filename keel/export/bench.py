"""`keel bench RUN_DIR`: every variant of a run's classifier measured side by side on its test split.

Variants: ``hf-pipeline`` (the fp32 model through transformers' plain ``pipeline("text-classification")``,
the baseline for every ratio), ``torch`` (keel's own PyTorch path) and, after `keel export`, ``onnx`` and
``onnx-int8``. Each variant is measured in a fresh process, so its peak RSS is its own.
Figures: accuracy and macro-F1, parameters, size on disk, p50/p95 latency at batch 1, throughput at batch 32.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from keel.errors import KeelError
from keel.export.onnx import export_dir, weights_bytes
from keel.io import atomic_write_json
from keel.progress import log

VARIANTS = ("hf-pipeline", "torch", "onnx", "onnx-int8")


def _weights_bytes(run_dir: Path, variant: str) -> int:
    if variant in ("hf-pipeline", "torch"):
        return sum(p.stat().st_size for p in (run_dir / "model").glob("*.safetensors"))
    return weights_bytes(export_dir(run_dir, variant))


def _param_count(folder: Path) -> int:
    """Parameters of the saved model, read from the safetensors headers (nothing is loaded)."""
    from safetensors import safe_open

    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            total += sum(int(np.prod(st.get_slice(k).get_shape())) for k in st.keys())
    return total


def measure_variant(run_dir: Path, variant: str, n_latency: int, n_eval: int) -> dict:
    """Runs inside the worker process: load one variant, then time and score it."""
    import resource

    import torch

    from keel.data.prepare import prepare_data
    from keel.evaluate import load_trained, text_logits
    from keel.train.metrics import classification_metrics

    torch.set_grad_enabled(False)
    t = load_trained(run_dir, "torch" if variant == "hf-pipeline" else variant)
    test = prepare_data(t.recipe, t.tokenizer).splits["test"]
    if len(test) == 0:
        raise KeelError("keel bench needs a test split; this run's recipe has data.split.test = 0")
    test = test.select(range(min(n_eval, len(test))))
    texts, labels = test["text"], t.info["labels"]
    max_len = t.recipe.model.max_length

    if variant == "hf-pipeline":
        from transformers import pipeline

        pipe = pipeline("text-classification", model=t.model, tokenizer=t.tokenizer, device=-1, top_k=None)

        def logits_of(batch: list[str]) -> np.ndarray:
            out = pipe(batch, batch_size=len(batch), truncation=True, max_length=max_len)
            return np.array([[next(s["score"] for s in row if s["label"] == name) for name in labels] for row in out])
    else:
        def logits_of(batch: list[str]) -> np.ndarray:
            return text_logits(t, batch).numpy()

    for text in texts[:5]:  # warm-up
        logits_of([text])
    lat = []
    for text in texts[:n_latency]:
        t0 = time.perf_counter()
        logits_of([text])
        lat.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    scores = [logits_of(texts[i: i + 32]) for i in range(0, len(texts), 32)]
    elapsed = time.perf_counter() - t0
    pred = np.concatenate(scores).argmax(-1)
    m = classification_metrics(np.asarray(test["label"]), pred, labels)
    params = _param_count(run_dir / "model")
    return {"variant": variant, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "n": m["n"], "params": params,
            "disk_mb": _weights_bytes(run_dir, variant) / 1e6,
            "p50_ms_batch1": float(np.percentile(lat, 50) * 1e3), "p95_ms_batch1": float(np.percentile(lat, 95) * 1e3),
            "throughput_batch32": len(texts) / elapsed,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench(run_dir: str | Path, n_latency: int = 100, n_eval: int = 1000) -> dict:
    """Measure every available variant (each in its own process) and write RUN_DIR/bench.json."""
    run_dir = Path(run_dir)
    if not (run_dir / "model").is_dir():
        raise KeelError(f"{run_dir} has no final model; train it first (`keel run RECIPE`)")
    available = [v for v in VARIANTS if v in ("hf-pipeline", "torch") or export_dir(run_dir, v).is_dir()]
    rows = []
    for variant in available:
        log(f"bench: measuring {variant}")
        proc = subprocess.run([sys.executable, "-m", "keel.export.bench", str(run_dir), variant, str(n_latency), str(n_eval)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise KeelError(f"bench: measuring {variant} failed: {tail}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = rows[0]
    for r in rows:
        r["speedup_p50_vs_pipeline"] = base["p50_ms_batch1"] / r["p50_ms_batch1"]
        r["throughput_vs_pipeline"] = r["throughput_batch32"] / base["throughput_batch32"]
        r["smaller_vs_pipeline"] = base["disk_mb"] / r["disk_mb"]
        r["accuracy_drop_points"] = (base["accuracy"] - r["accuracy"]) * 100
    result = {"baseline": base["variant"], "variants": rows, "n_latency": n_latency}
    atomic_write_json(run_dir / "bench.json", result)
    return result


if __name__ == "__main__":  # the worker: one variant, JSON on the last line of stdout
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run, variant, n_lat, n_ev = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    try:
        print(json.dumps(measure_variant(Path(run), variant, n_lat, n_ev)))
    except KeelError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
