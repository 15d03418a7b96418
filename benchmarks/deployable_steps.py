"""What each step of the deployable ONNX int8 model buys at batch 32, against the HF-pipeline fp32 teacher.

One process, alternating rounds (every variant once per round), the same validation batches as `keel bench`
(batches of 32 in the split's order, and the same length-sorted batches). The stage's model is exported twice
into a scratch folder, the padded graph (keel's export before packing) and the packed one (`keel.export.packed`,
keel's export now); each is quantized the ways INT8 lists (dynamic int8 per channel, keel's; per tensor;
reduce_range; static QDQ calibrated on training texts) and run with the ORT session settings THREADS
lists (ORT's default pool, one thread, two threads that sleep instead of spinning: keel's now).

    .venv/bin/python benchmarks/deployable_steps.py runs/quickstart [--stage pruned] [--rounds 5] [--n 500]
        [--only 'packed int8' ...] [--tag NAME]

Writes results/deployable-steps[-TAG]-cpu.json with the load average of each round. Timings on a shared machine
are noisy: read the ratios, which come from the same round (the median round's ratio is reported).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def export_graphs(stage_dir: Path, work: Path) -> tuple[dict[str, Path], object]:
    """The stage's model as padded and packed ONNX fp32 graphs, and its loaded run (for calibration texts)."""
    import torch

    from keel.export.onnx import _quiet, input_names
    from keel.export.packed import PackedBertClassifier
    from keel.runtime.load import load_trained

    t = load_trained(stage_dir)
    model, names = t.model.float().eval(), input_names(t.tokenizer)
    enc = t.tokenizer(
        ["a short one", "a somewhat longer sentence to check padding", "x"], padding=True, return_tensors="pt"
    )
    example = tuple(enc[n] for n in names)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=max(t.recipe.model.max_length, 8))
    out = {}
    for name, graph in (("padded", model), ("packed", PackedBertClassifier(model))):
        fp32 = work / f"{name}.onnx"
        with _quiet():
            torch.onnx.export(
                graph,
                example,
                str(fp32),
                input_names=names,
                output_names=["logits"],
                dynamic_shapes={n: {0: batch, 1: seq} for n in names},
                dynamo=True,
                external_data=True,
                verbose=False,
            )
        out[name] = fp32
    return out, t


# int8 recipes tried on a graph: ONNX Runtime's dynamic quantizer (weights int8, each activation's range computed
# at run time) with per-channel or per-tensor weight scales, with and without reduce_range (7-bit weights, for
# CPUs without VNNI); static QDQ (activation ranges calibrated once on training texts), int8 or uint8 activations.
INT8 = {
    "int8": {"per_channel": True},  # keel's export
    "int8 per-tensor": {"per_channel": False},
    "int8 per-tensor reduce_range": {"per_channel": False, "reduce_range": True},
    "static int8 (QDQ, s8s8)": {"static": "QInt8"},
    "static int8 (QDQ, u8s8)": {"static": "QUInt8"},
}


def quantize(fp32: Path, dst: Path, how: dict, trained, calibration: int = 128) -> Path:
    """``fp32`` quantized as ``how`` (an INT8 entry) says, at ``dst``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from keel.data.prepare import prepare_data
    from keel.export.onnx import _feeds, _quiet, input_names

    with _quiet():
        if "static" not in how:
            quantize_dynamic(str(fp32), str(dst), weight_type=QuantType.QInt8, **how)
            return dst
        tok, names = trained.tokenizer, input_names(trained.tokenizer)
        texts = prepare_data(trained.recipe, tok, trained.run_dir).splits["train"]["text"][:calibration]
        batches = iter(
            [_feeds(tok, texts[i : i + 8], names, trained.recipe.model.max_length) for i in range(0, len(texts), 8)]
        )

        class Reader(CalibrationDataReader):
            def get_next(self):
                return next(batches, None)

        quantize_static(
            str(fp32),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=True,
            activation_type=getattr(QuantType, how["static"]),
            weight_type=QuantType.QInt8,
            extra_options={"ActivationSymmetric": how["static"] == "QInt8"},
        )
    return dst


# ORT session settings tried on keel's int8 graph: its default (a thread per core, spinning between runs), one
# intra-op thread, two threads without spinning (a spinning pool burns a shared core while it waits)
THREADS = {"": (0, True), ", 1 thread": (1, True), ", 2 threads, no spinning": (2, False)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--stage", default="pruned")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=500, help="validation texts scored (the demo's bench scores 500)")
    ap.add_argument("--only", nargs="*", default=[], help="measure only the rows whose label contains one of these")
    ap.add_argument("--tag", default="", help="results/deployable-steps-TAG-cpu.json instead of the default name")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="one thread on both sides (torch and ORT) and the process's CPU time instead of the wall clock: an "
        "estimate of the one-core ratios that other processes' load does not inflate",
    )
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import onnxruntime as ort
    import torch

    from keel.compress.stages import stage_dir
    from keel.data.prepare import prepare_data
    from keel.export.bench import hf_pipeline, scoring_batches
    from keel.runtime.load import load_trained

    torch.set_grad_enabled(False)
    clock = time.process_time if args.cpu_time else time.perf_counter
    if args.cpu_time:
        torch.set_num_threads(1)
    teacher = load_trained(args.run_dir)
    split = prepare_data(teacher.recipe, teacher.tokenizer, teacher.run_dir).splits["validation"]
    split = split.select(range(min(args.n, len(split))))
    texts, y, labels = split["text"], np.asarray(split["label"]), teacher.info["labels"]
    tok, max_len = teacher.tokenizer, teacher.recipe.model.max_length
    in_order, by_length = scoring_batches(texts, tok, max_len)
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tok.model_input_names]
    pipe = hf_pipeline(teacher)

    def pipeline_logits(batch):
        out = pipe(batch, batch_size=len(batch), truncation=True, max_length=max_len)
        return np.array([[next(s["score"] for s in row if s["label"] == name) for name in labels] for row in out])

    def ort_logits(session):
        def run(batch):
            enc = tok(batch, truncation=True, max_length=max_len, padding=True, return_tensors="np")
            return session.run(None, {n: enc[n].astype(np.int64) for n in names})[0]

        return run

    variants = {"hf-pipeline (teacher fp32)": pipeline_logits}

    def add(label: str, path: Path, threads: int = 0, spin: bool = True) -> None:
        if args.cpu_time:  # every row on one thread, as the pipeline (spinning is moot then)
            if threads > 1 or not spin or label.endswith("1 thread"):
                return
            threads = 1
        if args.only and not any(k in label for k in args.only):
            return
        opts = ort.SessionOptions()
        opts.log_severity_level, opts.intra_op_num_threads = 3, threads
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        variants[label] = ort_logits(session)

    with tempfile.TemporaryDirectory(prefix="keel-steps-") as work:
        graphs, trained = export_graphs(stage_dir(args.run_dir, args.stage), Path(work))
        for graph, fp32 in graphs.items():
            add(f"{args.stage} {graph} fp32", fp32)
            for name, how in INT8.items():
                if graph == "padded" and name != "int8":
                    continue  # the padded graph is the point of comparison only
                path = quantize(fp32, Path(work) / f"{graph}-{name.replace(' ', '_')}.onnx", how, trained)
                for suffix, (threads, spin) in (
                    THREADS.items() if name in ("int8", "int8 per-tensor") else (("", (0, True)),)
                ):
                    add(f"{args.stage} {graph} {name}{suffix}", path, threads, spin)
        rows = {}
        for label, fn in variants.items():
            fn(texts[:32])  # warm-up
            pred = np.concatenate([fn([texts[i] for i in idx]) for idx in in_order]).argmax(-1)
            rows[label] = {
                "variant": label,
                "val_accuracy": float((pred == y).mean()),
                "s_in_order": [],
                "s_sorted": [],
            }
        loads = []
        for k in range(args.rounds):
            loads.append(os.getloadavg()[0])
            for label, fn in variants.items():
                for key, batches in (("s_in_order", in_order), ("s_sorted", by_length)):
                    t0 = clock()
                    for idx in batches:
                        fn([texts[i] for i in idx])
                    rows[label][key].append(clock() - t0)
            base = rows["hf-pipeline (teacher fp32)"]
            print(
                f"round {k + 1} (load {loads[-1]:.1f}): "
                + ", ".join(
                    f"{r['variant']} {base['s_in_order'][-1] / r['s_in_order'][-1]:.2f}x" for r in rows.values()
                ),
                flush=True,
            )
    base = rows["hf-pipeline (teacher fp32)"]
    for r in rows.values():
        r["throughput_batch32"] = len(texts) / min(r["s_in_order"])
        r["throughput_sorted_batch32"] = len(texts) / min(r["s_sorted"])
        # ratios within each round, then the median round: a slow spell costs both sides of a ratio alike
        r["x_in_order"] = float(np.median([b / s for b, s in zip(base["s_in_order"], r["s_in_order"])]))
        r["x_sorted"] = float(np.median([b / s for b, s in zip(base["s_sorted"], r["s_sorted"])]))
        r["accuracy_drop_points"] = (base["val_accuracy"] - r["val_accuracy"]) * 100
    print(f"\n{'variant':50} {'val acc':>7} {'drop':>5} {'b32/s':>7} {'sorted/s':>8} {'x thr':>6} {'x sorted':>8}")
    for r in rows.values():
        print(
            f"{r['variant']:50} {r['val_accuracy']:7.3f} {r['accuracy_drop_points']:5.1f} {r['throughput_batch32']:7.1f} "
            f"{r['throughput_sorted_batch32']:8.1f} {r['x_in_order']:6.2f} {r['x_sorted']:8.2f}"
        )
    RESULTS.mkdir(exist_ok=True)
    result = {
        "command": f"python benchmarks/deployable_steps.py {args.run_dir} --stage {args.stage} --rounds "
        f"{args.rounds} --n {args.n}"
        + (f" --only {' '.join(repr(o) for o in args.only)}" if args.only else "")
        + (f" --tag {args.tag}" if args.tag else "")
        + (" --cpu-time" if args.cpu_time else ""),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "load_average_1min_per_round": loads,
        "n": len(texts),
        "rows": list(rows.values()),
    }
    name = f"deployable-steps-{args.tag}-cpu.json" if args.tag else "deployable-steps-cpu.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
