"""The cost of encryption at rest on a finished run: sealing (seconds, MB/s) and opening at serve start-up.

Copies the run's model/ and export/ (and what loading reads: recipe.yaml, splits are not needed) to a temporary
folder, seals the copy with a random key, then loads the serving engine (`load_engine`, what `keel serve` does before
binding) from the plain and the sealed copy in alternating rounds in this one process (best of each kept), for the
torch and the onnx-int8 backends. Prints a table and writes benchmarks/results/seal-cost-cpu.json.

    .venv/bin/python benchmarks/seal_cost.py runs/quickstart [--rounds 3]
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _copy(run: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in ("model", "export", "recipe.yaml", "run.json"):
        src = run / name
        if src.is_dir():
            shutil.copytree(src, dst / name)
        elif src.is_file():
            shutil.copy2(src, dst / name)
    return dst


def main(argv: list[str]) -> dict:
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    rounds = int(argv[argv.index("--rounds") + 1]) if "--rounds" in argv else 3
    run = Path(argv[0])
    from keel.secure.seal import seal_run
    from keel.serve.engines import load_engine

    with tempfile.TemporaryDirectory() as tmp:
        plain, sealed = _copy(run, Path(tmp) / "plain"), _copy(run, Path(tmp) / "sealed")
        key = secrets.token_bytes(32)
        start = time.perf_counter()
        done = seal_run(sealed, key)
        seal_s = time.perf_counter() - start
        total = sum(d["bytes"] for d in done)
        os.environ["KEEL_SEAL_KEY"] = key.hex()
        load_engine(str(plain), "torch")  # imports and first-touch costs out of the timings
        startup = {}
        for backend in ("torch", "onnx-int8"):
            best = {"plain": float("inf"), "sealed": float("inf")}
            for _ in range(rounds):
                for name, target in (("plain", plain), ("sealed", sealed)):
                    start = time.perf_counter()
                    engine = load_engine(str(target), backend)
                    best[name] = min(best[name], time.perf_counter() - start)
                    assert engine.classify(["a fine day"])[0]["label"]
            startup[backend] = {
                "plain_s": round(best["plain"], 3),
                "sealed_s": round(best["sealed"], 3),
                "extra_s": round(best["sealed"] - best["plain"], 3),
                "ratio": round(best["sealed"] / best["plain"], 2),
            }
    result = {
        "run": run.name,
        "folders": [Path(d["folder"]).name for d in done],
        "plaintext_mb": round(total / 1e6, 1),
        "seal_s": round(seal_s, 2),
        "seal_mb_per_s": round(total / 1e6 / seal_s, 1),
        "serve_startup": startup,
        "rounds": rounds,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "note": "load_engine as `keel serve` runs it; best of the alternating rounds; a shared 2-core machine",
    }
    print(
        f"sealed {result['plaintext_mb']} MB ({', '.join(result['folders'])}) in {result['seal_s']} s = "
        f"{result['seal_mb_per_s']} MB/s"
    )
    print(f"{'backend':<10} {'plain s':>8} {'sealed s':>9} {'extra s':>8} {'ratio':>6}")
    for backend, row in startup.items():
        print(f"{backend:<10} {row['plain_s']:>8} {row['sealed_s']:>9} {row['extra_s']:>8} {row['ratio']:>6}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "seal-cost-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
