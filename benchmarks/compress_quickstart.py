"""The compression targets on the quickstart data: the deployable variant vs the HF-pipeline fp32 teacher.

Targets (2-core CPU): >= 8x throughput at batch 32, >= 6x lower p50 latency at batch 1, >= 8x smaller on disk,
<= 1.0 point accuracy drop. Runs `keel compress` on a finished quickstart run (or `keel quickstart` first),
prints the table and writes benchmarks/results/compress-quickstart-cpu.json.

    .venv/bin/python benchmarks/compress_quickstart.py                  # trains the teacher too (~10 min)
    .venv/bin/python benchmarks/compress_quickstart.py runs/quickstart  # compress an existing run
    .venv/bin/python benchmarks/compress_quickstart.py runs/quickstart compress.prune.ffn=0.25 --tag ffn25

Every variant is scored on the whole validation split (1,000 tweets; the pick is made there) and timed on 100 texts,
in 3 rounds (each ratio the median of the rounds' ratios), unless the overrides say otherwise; the deployable variant alone is
then scored on the test split, and its accuracy target is judged on that. Throughput is measured on the same batches
of 32 (in the split's order) for every variant and the pipeline; the length-sorted ratio compares the same sorted
batches. `--tag NAME` writes results/compress-quickstart-NAME-cpu.json.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TARGETS = {"throughput_vs_pipeline": 8.0, "speedup_p50_vs_pipeline": 6.0, "smaller_vs_pipeline": 8.0}
MAX_DROP = 1.0


def main(argv: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    tag = None
    if "--tag" in argv:
        i = argv.index("--tag")
        tag, argv = argv[i + 1], argv[:i] + argv[i + 2 :]
    run_dir = Path(argv[0]).resolve() if argv and "=" not in argv[0] else None
    overrides = [a for a in argv if "=" in a]
    for key, value in (
        ("compress.bench_eval_samples", 1000),
        ("compress.bench_latency_samples", 100),
        ("compress.bench_rounds", 3),
    ):
        if not any(o.startswith(key + "=") for o in overrides):
            overrides.append(f"{key}={value}")
    work = tempfile.mkdtemp(prefix="keel-compress-bench-")
    t0 = time.perf_counter()
    if run_dir is None:
        cmd = [sys.executable, "-m", "keel", "quickstart", *overrides]
        run_dir = Path(work) / "runs" / "quickstart"
    else:
        cmd = [sys.executable, "-m", "keel", "compress", str(run_dir), *overrides]
    proc = subprocess.run(cmd, cwd=work, env=env, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:  # the run directory may still hold an earlier bench: write nothing from it
        sys.exit(f"keel {cmd[3]} exited {proc.returncode}; no results written")
    bench = json.loads((run_dir / "bench.json").read_text())
    pick = json.loads((run_dir / "compress" / "deployable.json").read_text())
    rows = bench["variants"]
    print(
        f"\n{'variant':28} {'val acc':>7} {'drop':>6} {'MB':>7} {'p50 ms':>7} {'b32/s':>8} {'x p50':>6} {'x thr':>6} "
        f"{'x sort':>6} {'x size':>6}"
    )
    for r in rows:
        print(
            f"{r['variant']:28} {r['accuracy']:7.4f} {r['accuracy_drop_points']:6.2f} {r['disk_mb']:7.1f} "
            f"{r['p50_ms_batch1']:7.2f} {r['throughput_batch32']:8.1f} {r['speedup_p50_vs_pipeline']:6.2f} "
            f"{r['throughput_vs_pipeline']:6.2f} {r.get('throughput_sorted_vs_pipeline', float('nan')):6.2f} "
            f"{r['smaller_vs_pipeline']:6.2f}"
        )
    best, test = pick.get("figures") or {}, pick.get("test") or {}
    verdict = {k: (best.get(k, 0) >= v) for k, v in TARGETS.items()}
    verdict["accuracy_drop_points"] = test.get("accuracy_drop_points", 99) <= MAX_DROP  # on the test split, once
    print(
        f"\ndeployable: {pick.get('deployable')} (test accuracy {test.get('accuracy')}, "
        f"{test.get('accuracy_drop_points', float('nan')):.2f} points below the teacher); targets met: {verdict}"
    )
    import torch

    shown = (["runs/quickstart"] if argv and "=" not in argv[0] else []) + overrides  # no local paths in results
    shown += ["--tag", tag] if tag else []
    result = {
        "command": " ".join(["python", "benchmarks/compress_quickstart.py", *shown]),
        "exit_code": proc.returncode,
        "wall_seconds": round(wall, 1),
        "deployable": pick.get("deployable"),
        "targets": TARGETS,
        "max_accuracy_drop": MAX_DROP,
        "targets_met": verdict,
        "variants": rows,
        "test": test,
        "picked_on": pick.get("picked_on"),
        "stages": {
            s: json.loads(p.read_text())
            for s in ("student", "pruned")
            if (p := run_dir / "compress" / s / "model" / "keel.json").is_file()
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"compress-quickstart-{tag + '-' if tag else ''}cpu.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
