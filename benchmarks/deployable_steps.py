"""What each step of the deployable ONNX int8 model buys at batch 32, against the HF-pipeline fp32 teacher.

One process, alternating rounds (every variant once per round, best round kept), the same validation batches as
`keel bench` (batches of 32 in the split's order, and the same length-sorted batches). The stage's model is
exported twice into a scratch folder, the padded graph (keel's export before packing) and the packed one
(`keel.export.packed`, keel's export now), each quantized with ONNX Runtime's dynamic int8 as keel does, and each
run with ORT's default threads (int8 also with one intra-op thread).

    .venv/bin/python benchmarks/deployable_steps.py runs/quickstart [--stage pruned] [--rounds 5] [--n 500]

Writes results/deployable-steps-cpu.json. Timings on a shared machine are noisy: read the ratios, which come from
the same round.
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


def export_graphs(stage_dir: Path, work: Path) -> dict[str, Path]:
    """The stage's model as padded and packed ONNX graphs, fp32 and dynamic int8."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

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
        fp32, int8 = work / f"{name}.onnx", work / f"{name}-int8.onnx"
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
            quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
        out[f"{name}-fp32"], out[f"{name}-int8"] = fp32, int8
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--stage", default="pruned")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=500, help="validation texts scored (the demo's bench scores 500)")
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
    with tempfile.TemporaryDirectory(prefix="keel-steps-") as work:
        graphs = export_graphs(stage_dir(args.run_dir, args.stage), Path(work))
        for name, path in graphs.items():
            for threads in (0, 1) if name.endswith("int8") else (0,):
                opts = ort.SessionOptions()
                opts.log_severity_level, opts.intra_op_num_threads = 3, threads
                session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
                variants[f"{args.stage} {name}" + (", 1 thread" if threads else "")] = ort_logits(session)
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
        for k in range(args.rounds):
            for label, fn in variants.items():
                for key, batches in (("s_in_order", in_order), ("s_sorted", by_length)):
                    t0 = time.perf_counter()
                    for idx in batches:
                        fn([texts[i] for i in idx])
                    rows[label][key].append(time.perf_counter() - t0)
            base = rows["hf-pipeline (teacher fp32)"]
            print(
                f"round {k + 1}: "
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
    print(f"\n{'variant':34} {'val acc':>7} {'drop':>5} {'b32/s':>7} {'sorted/s':>8} {'x thr':>6} {'x sorted':>8}")
    for r in rows.values():
        print(
            f"{r['variant']:34} {r['val_accuracy']:7.3f} {r['accuracy_drop_points']:5.1f} {r['throughput_batch32']:7.1f} "
            f"{r['throughput_sorted_batch32']:8.1f} {r['x_in_order']:6.2f} {r['x_sorted']:8.2f}"
        )
    RESULTS.mkdir(exist_ok=True)
    result = {
        "command": f"python benchmarks/deployable_steps.py {args.run_dir} --stage {args.stage} --rounds "
        f"{args.rounds} --n {args.n}",
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "n": len(texts),
        "rows": list(rows.values()),
    }
    (RESULTS / "deployable-steps-cpu.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
