"""In-browser latency per text: the web export's page (WASM, 1 and 2 threads) against Python ONNX Runtime.

    make web-runtime && python benchmarks/web_latency.py          # minilm-l6 (the demo's model size), untrained head
    python benchmarks/web_latency.py --run runs/quickstart        # the web export of a trained classification run

One text per call, as the page classifies what a person types: tokenizer + model + softmax, timed inside the page
(performance.now) and in Python (perf_counter) around the same steps. Same machine, same graph file (int8 by
default, the page's default; --dtypes q8,fp32 adds fp32), same texts (tweets-sentiment). The configurations
alternate round by round, so a busy machine slows them alike; each figure is the median of the rounds' p50s.
Writes benchmarks/results/web-latency-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the DevTools driver the tests use
from serve_common import write_result  # noqa: E402
from web_browser import Chromium, StaticServer, chromium  # noqa: E402

TIME_IN_PAGE = """(async (texts) => {
  const ms = [];
  for (const t of texts) {
    const start = performance.now();
    await window.keel.classify([t]);
    ms.push(performance.now() - start);
  }
  return ms;
})(%s)"""


def tweets(n: int) -> list[str]:
    from keel.data.builtin import DATASETS

    spec = DATASETS["tweets-sentiment"]
    frame = spec.read(spec.paths())
    return [str(t) for t in frame[spec.columns["text"]].dropna().tolist()[:n]]


def build_folder(args, work: Path) -> Path:
    if args.run:
        from keel.export.web import export_web

        return Path(export_web(args.run)["folder"])
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from keel.export.web import write_web_folder
    from keel.models.registry import model_dir

    folder = model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)  # speed does not need training
    dest = work / "web"
    labels = ["negative", "neutral", "positive"]
    write_web_folder(model, tokenizer, labels, dest, tweets(16), max_len=args.max_length, title=args.model)
    return dest


def python_ort(folder: Path, dtype: str, threads: int, texts: list[str], max_len: int) -> list[float]:
    import numpy as np
    import onnxruntime as ort
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    name = "model_quantized.onnx" if dtype == "q8" else "model.onnx"
    session = ort.InferenceSession(str(folder / "onnx" / name), opts, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    ms = []
    for t in texts:
        start = time.perf_counter()
        enc = tokenizer([t], truncation=True, max_length=max_len, return_tensors="np")
        logits = session.run(None, {n: enc[n].astype(np.int64) for n in inputs})[0]
        z = np.exp(logits - logits.max(-1, keepdims=True))
        _probs = z / z.sum(-1, keepdims=True)  # noqa: F841  (the page's softmax, timed alike)
        ms.append((time.perf_counter() - start) * 1e3)
    return ms


def chromium_version() -> str:
    import subprocess

    return subprocess.run([chromium(), "--version"], capture_output=True, text=True).stdout.strip()


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm-l6", help="a registry classifier backbone (ignored with --run)")
    ap.add_argument("--run", help="a classification run directory: its web export is measured")
    ap.add_argument("--n", type=int, default=100, help="texts timed per configuration and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--dtypes", default="q8", help="comma-separated: q8 (int8, the page's default), fp32")
    args = ap.parse_args()
    if chromium() is None:
        sys.exit("web_latency needs chromium (apt-get install chromium)")
    texts, warm = tweets(args.n + 10)[10:], tweets(10)
    dtypes = args.dtypes.split(",")
    samples: dict[str, list[list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = build_folder(args, work)
        server, page = StaticServer(folder), Chromium(work / "profile")
        try:
            for r in range(args.rounds):
                for dtype in dtypes:
                    for threads in (1, 2):
                        page.open(f"{server.url}?dtype={dtype}&threads={threads}")
                        assert page.evaluate("keel.threads") == threads and page.evaluate("keel.isolated")
                        page.evaluate(TIME_IN_PAGE % json.dumps(warm), timeout=600)
                        key = f"browser-wasm-{dtype}-{threads}t"
                        samples.setdefault(key, []).append(page.evaluate(TIME_IN_PAGE % json.dumps(texts), timeout=600))
                        python_ort(folder, dtype, threads, warm, args.max_length)
                        key = f"python-ort-{dtype}-{threads}t"
                        samples.setdefault(key, []).append(python_ort(folder, dtype, threads, texts, args.max_length))
                print(
                    f"round {r + 1}/{args.rounds}: "
                    + ", ".join(f"{k} {p(v[-1], 50):.2f} ms" for k, v in samples.items())
                )
            assert page.errors == [], page.errors
        finally:
            page.close()
            server.stop()
        bytes_ = {p_.name: p_.stat().st_size for p_ in (folder / "onnx").iterdir()}
        meta = json.loads((folder / "keel.json").read_text())
    rows = {
        k: {
            "p50_ms": statistics.median(p(r, 50) for r in v),
            "p95_ms": statistics.median(p(r, 95) for r in v),
            "p50_ms_by_round": [round(p(r, 50), 3) for r in v],
        }
        for k, v in samples.items()
    }
    for dtype in dtypes:
        for threads in (1, 2):
            b, py = rows[f"browser-wasm-{dtype}-{threads}t"], rows[f"python-ort-{dtype}-{threads}t"]
            b["p50_vs_python_ort"] = round(b["p50_ms"] / py["p50_ms"], 2)
    print(f"{'configuration':28} {'p50 ms':>8} {'p95 ms':>8} {'vs Python ORT':>14}")
    for k, row in rows.items():
        ratio = f"{row['p50_vs_python_ort']:.2f}x" if "p50_vs_python_ort" in row else ""
        print(f"{k:28} {row['p50_ms']:8.2f} {row['p95_ms']:8.2f} {ratio:>14}")
    write_result(
        "web-latency-cpu",
        {
            "model": args.run or args.model,
            "max_length": args.max_length,
            "texts": len(texts),
            "rounds": args.rounds,
            "onnx_bytes": bytes_,
            "runtime": meta.get("runtime"),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "load_average_at_end": os.getloadavg(),
            },
            "chromium": chromium_version(),
            "configurations": rows,
        },
    )


if __name__ == "__main__":
    main()
