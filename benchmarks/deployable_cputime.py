"""Deployable variants of one or more runs against the HF-pipeline fp32 teacher, one thread each side, timed by
process CPU time: a load-robust ratio on a shared machine.

`keel bench` times wall clock with every side's default threads, which is what a caller sees on idle cores but
is skewed by other processes' load (the pipeline's PyTorch threads lose more to it than ONNX Runtime's). Here
every side runs on one thread (torch.set_num_threads(1), ORT intra_op_num_threads=1, keel's session options
otherwise), in one process, alternating rounds (the order reversed every other round), on `keel bench`'s own
batches of 32 from the first run's validation split (in file order, and the same length-sorted batches), after
the same two untimed warm-up batches; each ratio is the median of the rounds' ratios, with its range.

    .venv/bin/python benchmarks/deployable_cputime.py runs/quickstart:pruned-onnx-int8 runs/q2:pruned-onnx-int8
        [--rounds 3] [--tag NAME]

Every run must share the first run's teacher and splits (copies of one run compressed differently). Writes
results/deployable-cputime[-TAG]-cpu.json (CPU and wall seconds per pass and round, load averages, accuracies).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+", help="RUN_DIR:VARIANT, e.g. runs/quickstart:pruned-onnx-int8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import numpy as np
    import torch

    import keel.runtime.ort as ort_settings
    from keel.data.prepare import prepare_data
    from keel.export.bench import WARMUP_BATCHES, hf_pipeline, scoring_batches
    from keel.io import atomic_write_json
    from keel.rundir import variant_location
    from keel.runtime.load import load_trained, text_logits

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    keel_options = ort_settings.session_options

    def one_thread():
        opts = keel_options()
        opts.intra_op_num_threads = 1
        return opts

    ort_settings.session_options = one_thread  # every session keel opens from here on

    first_run = Path(args.variants[0].split(":")[0])
    base = load_trained(first_run, "torch")
    split = prepare_data(base.recipe, base.tokenizer, base.run_dir).splits["validation"]
    texts, y = split["text"], np.asarray(split["label"])
    labels, max_len = base.info["labels"], base.recipe.model.max_length
    pipe = hf_pipeline(base)

    def pipeline_logits(batch):
        out = pipe(batch, batch_size=len(batch), truncation=True, max_length=max_len)
        return np.array([[next(s["score"] for s in row if s["label"] == n) for n in labels] for row in out])

    models = {"hf-pipeline": pipeline_logits}
    for spec in args.variants:
        run, variant = spec.split(":")
        trained = load_trained(*variant_location(Path(run), variant))
        models[spec] = lambda batch, t=trained: text_logits(t, batch).numpy()
    in_order, by_length = scoring_batches(texts, base.tokenizer, max_len)

    passes = {m: {k: [] for k in ("cpu", "wall", "cpu_sorted", "wall_sorted")} for m in models}
    accuracy, load = {}, []
    for k in range(args.rounds):
        load.append(os.getloadavg()[0])
        for name in list(models) if k % 2 == 0 else list(models)[::-1]:
            logits_of = models[name]
            for idx in in_order[:WARMUP_BATCHES]:
                logits_of([texts[i] for i in idx])
            for suffix, batches in (("", in_order), ("_sorted", by_length)):
                c0, w0 = time.process_time(), time.perf_counter()
                pred = np.concatenate([logits_of([texts[i] for i in idx]) for idx in batches]).argmax(-1)  # (N,)
                passes[name]["cpu" + suffix].append(time.process_time() - c0)
                passes[name]["wall" + suffix].append(time.perf_counter() - w0)
                if not suffix:
                    accuracy[name] = float((pred == y).mean())
            print(f"round {k + 1} {name}: cpu {passes[name]['cpu'][-1]:.2f} s, load {os.getloadavg()[0]:.1f}")
    load.append(os.getloadavg()[0])

    ratios = {}
    print(f"\n{'variant':45} {'val acc':>7} {'x cpu':>18} {'x cpu sorted':>18} {'x wall':>18}")
    for name in models:
        ratios[name] = {}
        for key in ("cpu", "cpu_sorted", "wall"):
            per_round = [b / v for b, v in zip(passes["hf-pipeline"][key], passes[name][key])]
            ratios[name][key] = [float(np.median(per_round)), min(per_round), max(per_round)]
        cells = [f"{r[0]:6.2f} ({r[1]:.2f}-{r[2]:.2f})" for r in ratios[name].values()]
        print(f"{name:45} {accuracy[name]:7.3f} " + " ".join(f"{c:>18}" for c in cells))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"deployable-cputime{'-' + args.tag if args.tag else ''}-cpu.json"
    doc = {
        "command": "python benchmarks/deployable_cputime.py " + " ".join(args.variants) + f" --rounds {args.rounds}",
        "n": len(texts),
        "threads": 1,
        "warmup_batches": WARMUP_BATCHES,
        "load_average": load,
        "accuracy": accuracy,
        "ratios_median_min_max": ratios,
        "seconds": passes,
    }
    atomic_write_json(out, doc)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
