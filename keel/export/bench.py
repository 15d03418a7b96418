"""`keel bench RUN_DIR`: every variant of a run's classifier measured side by side on its validation split.

Variants: ``hf-pipeline`` (the fp32 teacher through transformers' plain ``pipeline("text-classification")``,
the baseline for every ratio), then ``<stage>-<backend>`` for every model keel made: stages ``teacher``,
``student``, ``pruned``; backends ``torch``, ``onnx``, ``onnx-int8``, ``onnx-static-int8``, ``torchao-*``.
Each variant is measured in a fresh process (forked from a server that did the imports), so its peak RSS is its own.

Scores come from the validation split, because the budgeted pick is made on them: the test split stays unseen
until the chosen variant is scored on it once (`keel.compress.budget`). Every variant, the baseline included,
scores the same texts in the same batches, so a ratio compares models, not batching:
``throughput_batch32`` uses batches of 32 in the split's order (as a caller sends them);
``throughput_sorted_batch32`` uses batches of 32 texts of similar length (as `keel predict`, `keel eval` and the
server group them), again the same batches for every variant and the pipeline. Each side first scores the same two
batches of 32 untimed (a process's first full batches pay one-off allocations), and with several rounds each ratio
is the median of per-round ratios, with its range and the machine's load average beside it (`bench`).
Figures: accuracy and macro-F1, parameters, size on disk, p50/p95 latency at batch 1, both throughputs.
"""

from __future__ import annotations

import atexit
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from keel.errors import KeelError
from keel.export.onnx import weights_bytes
from keel.io import atomic_write_json, writes_run
from keel.rundir import STAGES, export_dir, stage_dir, variant_location

logger = logging.getLogger(__name__)


def available_variants(run_dir: Path) -> list[str]:
    """Every variant on disk: the teacher and each compression stage, with their exports."""
    out = []
    for stage in ("teacher", *STAGES):
        folder = stage_dir(run_dir, stage)
        if (folder / "model").is_dir():
            out.append(f"{stage}-torch")
            out += [f"{stage}-{b}" for b in ("onnx", "onnx-int8", "onnx-static-int8") if export_dir(folder, b).is_dir()]
    return out


def _weights_bytes(folder: Path, backend: str) -> int:
    """Weights on disk; torchao variants are quantized at load time, so theirs is the fp32 file they load."""
    if backend == "torch" or backend.startswith("torchao-"):
        return sum(p.stat().st_size for p in (folder / "model").glob("*.safetensors"))
    return weights_bytes(export_dir(folder, backend))


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
    import torch

    from keel.data.prepare import prepare_data
    from keel.metrics import classification_metrics
    from keel.runtime.load import load_trained, text_logits

    torch.set_grad_enabled(False)
    folder, backend = (run_dir, "torch") if variant == "hf-pipeline" else variant_location(run_dir, variant)
    t = load_trained(folder, backend)
    split = prepare_data(t.recipe, t.tokenizer, t.run_dir).splits["validation"]  # frozen at training time
    if len(split) == 0:
        raise KeelError(
            "keel bench scores the variants on the validation split (the test split is kept for the "
            "chosen one); this run's recipe has data.split.validation = 0: retrain with a validation split"
        )
    split = split.select(range(min(n_eval, len(split))))
    texts, labels = split["text"], t.info["labels"]
    max_len = t.recipe.model.max_length

    if variant == "hf-pipeline":
        pipe = hf_pipeline(t)

        def logits_of(batch: list[str]) -> np.ndarray:
            out = pipe(batch, batch_size=len(batch), truncation=True, max_length=max_len)
            return np.array([[next(s["score"] for s in row if s["label"] == name) for name in labels] for row in out])
    else:

        def logits_of(batch: list[str]) -> np.ndarray:
            return text_logits(t, batch).numpy()

    for text in texts[:5]:  # warm-up at batch 1
        logits_of([text])
    lat = []
    for text in texts[:n_latency]:
        t0 = time.perf_counter()
        logits_of([text])
        lat.append(time.perf_counter() - t0)
    in_order, by_length = scoring_batches(texts, t.tokenizer, max_len)
    timed = time_batches(logits_of, texts, in_order, by_length)
    pred = timed.pop("logits").argmax(-1)  # (N,)
    m = classification_metrics(np.asarray(split["label"]), pred, labels)
    params = _param_count(folder / "model")
    return {
        "variant": variant,
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "n": m["n"],
        "params": params,
        "disk_mb": _weights_bytes(folder, backend) / 1e6,
        "p50_ms_batch1": float(np.percentile(lat, 50) * 1e3),
        "p95_ms_batch1": float(np.percentile(lat, 95) * 1e3),
        **timed,
        "peak_rss_mb": _peak_rss_mb(),
    }


WARMUP_BATCHES = 2  # batches of 32 every side scores untimed first: its first full batches pay one-off allocations


def time_batches(logits_of, texts: list[str], in_order: list, by_length: list, clock=time.perf_counter) -> dict:
    """Both batch-32 passes of one variant, after the same untimed warm-up batches every variant gets.

    Returns the in-order pass's logits (N, C) and, for each pass, samples/s by wall clock and the seconds of CPU
    this process used (every thread's; informational: a spinning thread pool burns CPU time without working)."""
    for idx in in_order[:WARMUP_BATCHES]:
        logits_of([texts[i] for i in idx])
    t0, c0 = clock(), time.process_time()
    logits = np.concatenate([logits_of([texts[i] for i in idx]) for idx in in_order])  # (N, C)
    elapsed, cpu = clock() - t0, time.process_time() - c0
    t0, c0 = clock(), time.process_time()
    for idx in by_length:
        logits_of([texts[i] for i in idx])
    elapsed_sorted, cpu_sorted = clock() - t0, time.process_time() - c0
    return {
        "logits": logits,
        "throughput_batch32": len(texts) / elapsed,
        "throughput_sorted_batch32": len(texts) / elapsed_sorted,
        "cpu_s_batch32": cpu,
        "cpu_s_sorted_batch32": cpu_sorted,
    }


def hf_pipeline(t):
    """The baseline: transformers' plain text-classification pipeline around the fp32 teacher, on the CPU."""
    from transformers import pipeline

    return pipeline("text-classification", model=t.model, tokenizer=t.tokenizer, device=-1, top_k=None)


def scoring_batches(texts: list[str], tokenizer, max_length: int, size: int = 32) -> tuple[list, list]:
    """(batches of ``size`` in the texts' order, batches of ``size`` texts of similar length), as row indices.

    Both depend only on the texts and the tokenizer, so every variant and the pipeline get the very same batches."""
    from keel.tasks.classification import length_batches

    in_order = [list(range(i, min(i + size, len(texts)))) for i in range(0, len(texts), size)]
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]
    return in_order, length_batches(lengths, size)


def _peak_rss_mb() -> float:
    """This process's own peak RSS, the imports it shares with the fork server included (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@writes_run
def bench(
    run_dir: str | Path, n_latency: int = 100, n_eval: int = 1000, variants: list[str] | None = None, rounds: int = 1
) -> dict:
    """Measure the HF-pipeline baseline and every variant (default: all on disk), each in its own process;
    write RUN_DIR/bench.json.

    With ``rounds`` > 1 the variants take turns, round after round, the order reversed every other round (so no
    variant always runs right after the pipeline). A ratio to the pipeline is taken within each round, against the
    pipeline's measurement of that round, and the median of the rounds' ratios is reported, with the lowest and
    highest in ``<ratio>_range``; timings are the medians of the rounds. ``load_average`` holds the machine's
    1-minute load at each round's start and end: on a busy machine the pipeline's PyTorch threads lose more to the
    other work than ONNX Runtime's do, which inflates the ratios, and bench says so.
    """
    import os

    run_dir = Path(run_dir)
    if not (run_dir / "model").is_dir():
        raise KeelError(f"{run_dir} has no final model; train it first (`keel train RECIPE`)")
    names = ["hf-pipeline", *(variants or available_variants(run_dir))]
    measured: list[dict[str, dict]] = []  # one {variant: row} per round
    load = []
    for k in range(rounds):
        start = os.getloadavg()[0]
        measured.append({})
        for variant in names if k % 2 == 0 else names[::-1]:
            logger.info(f"bench: measuring {variant}" + (f" (round {k + 1} of {rounds})" if rounds > 1 else ""))
            measured[k][variant] = _measure(run_dir, variant, n_latency, n_eval)
        load.append([round(start, 2), round(os.getloadavg()[0], 2)])
    rows = [summarize([m[v] for m in measured], [m[names[0]] for m in measured]) for v in names]
    cpus = os.cpu_count() or 1
    if max(max(pair) for pair in load) > cpus + 1:  # the measured process itself keeps up to ~cpus busy
        logger.warning(
            f"bench: the machine was busy (1-minute load average up to {max(max(p) for p in load):.1f} on {cpus} "
            "CPUs): the ratios to the pipeline are inflated under load; re-measure on idle cores"
        )
    result = {
        "baseline": names[0],
        "split": "validation",
        "variants": rows,
        "n_latency": n_latency,
        "rounds": rounds,
        "warmup_batches": WARMUP_BATCHES,
        "load_average": load,
        "cpus": cpus,
    }
    atomic_write_json(run_dir / "bench.json", result)
    return result


# ratio name -> (figure, True when higher is better): a variant's figure over the pipeline's, or the inverse
RATIOS = {
    "speedup_p50_vs_pipeline": ("p50_ms_batch1", False),
    "throughput_vs_pipeline": ("throughput_batch32", True),
    "throughput_sorted_vs_pipeline": ("throughput_sorted_batch32", True),
}
_TIMINGS = ("p50_ms_batch1", "p95_ms_batch1", "throughput_batch32", "throughput_sorted_batch32")


def summarize(rounds: list[dict], base_rounds: list[dict]) -> dict:
    """One variant's measurements (one row per round) -> its row: median timings, and each ratio to the pipeline
    as the median of the rounds' ratios (each against the pipeline's row of the same round) with its range."""
    row = dict(rounds[0])  # scores, size and parameters are the same every round: the model is
    for key in _TIMINGS + ("cpu_s_batch32", "cpu_s_sorted_batch32"):
        if all(key in r for r in rounds):
            row[key] = float(np.median([r[key] for r in rounds]))
    row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rounds)
    for name, (key, higher) in RATIOS.items():
        ratios = [r[key] / b[key] if higher else b[key] / r[key] for r, b in zip(rounds, base_rounds)]
        row[name] = float(np.median(ratios))
        row[f"{name}_range"] = [min(ratios), max(ratios)]
    base = base_rounds[0]
    row["smaller_vs_pipeline"] = base["disk_mb"] / row["disk_mb"]
    row["accuracy_drop_points"] = (base["accuracy"] - row["accuracy"]) * 100
    return row


# Each variant is measured in a fresh process, so its peak RSS and its warm caches are its own. Starting Python and
# importing torch, transformers and ONNX Runtime costs ~6 s per process, so one fork server does the imports once
# and forks a child per measurement. Nothing in the server runs torch or ONNX Runtime: no thread pool is forked.
_PRELOAD = [
    "numpy",
    "torch",
    "transformers",
    "datasets",
    "sklearn.metrics",
    "onnxruntime",
    "keel.runtime.load",
    "keel.evaluate",
    "keel.data.prepare",
    "keel.compress.stages",
]
_server: subprocess.Popen | None = None


def _measure(run_dir: Path, variant: str, n_latency: int, n_eval: int) -> dict:
    global _server
    if _server is None or _server.poll() is not None:
        _server = subprocess.Popen(
            [sys.executable, "-m", "keel.export.bench"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        atexit.register(_server.stdin.close)  # the server exits when its input ends
    try:
        _server.stdin.write(json.dumps([str(run_dir), variant, n_latency, n_eval]) + "\n")
        _server.stdin.flush()
        answer = _server.stdout.readline()
    except BrokenPipeError:  # the server itself died (killed): reported below with its exit code
        answer = ""
    if not answer:
        raise KeelError(f"bench: measuring {variant} failed: the measuring process exited with code {_server.wait()}")
    status, payload = json.loads(answer)
    if status != "ok":
        raise KeelError(f"bench: measuring {variant} failed: {payload}")
    return payload


def _serve() -> None:
    """The fork server: one JSON request per input line, one JSON answer per output line."""
    import importlib
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in _PRELOAD:
        importlib.import_module(name)
    answers = os.fdopen(os.dup(1), "w")
    quiet = os.open(os.devnull, os.O_WRONLY)  # loading logs and library warnings: the parent reports the figures
    os.dup2(quiet, 1)
    os.dup2(quiet, 2)
    while line := sys.stdin.readline():
        run, variant, n_latency, n_eval = json.loads(line)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, answer, and leave without running the server's clean-up
            os.close(read_end)
            try:
                answer = ["ok", measure_variant(Path(run), variant, n_latency, n_eval)]
            except KeelError as e:
                answer = ["error", str(e)]
            except Exception as e:  # noqa: BLE001  (one line for the parent; a traceback would go nowhere)
                answer = ["error", f"{type(e).__name__}: {e}"]
            with os.fdopen(write_end, "w") as out:
                out.write(json.dumps(answer))
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as result:
            answer = result.read()
        _, status = os.waitpid(pid, 0)
        if not answer:  # killed (out of memory, a signal) before it could answer
            answer = json.dumps(["error", f"its process ended with exit status {os.waitstatus_to_exitcode(status)}"])
        answers.write(answer + "\n")
        answers.flush()


if __name__ == "__main__":
    _serve()
