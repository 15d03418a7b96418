"""`keel export RUN_DIR --target mobile`: ONNX Runtime's mobile format (.ort), for ORT Mobile on Android and iOS.

    runs/<name>/export/mobile/
        model.ort, model_quantized.ort   fp32 and dynamic int8, the standard padded graph (as --target web)
        required_operators.config        the operators both models use: a reduced ONNX Runtime build takes it
                                         (build.py --minimal_build --include_ops_by_config required_operators.config)
        config.json, tokenizer.json, ... the labels and the tokenizer, for the app's own preprocessing
        keel.json, manifest.json

The conversion is onnxruntime's own (`python -m onnxruntime.tools.convert_onnx_models_to_ort`, optimization style
Fixed); each .ort file is loaded back in ONNX Runtime and must give the logits of the .onnx graph it came from.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from keel.errors import KeelError
from keel.export.onnx import export_classifier
from keel.export.web import write_model_files, write_standard_graph
from keel.io import atomic_dir, writes_run
from keel.runtime.ort import session

MOBILE = "mobile"
MODELS = ("model", "model_quantized")
OPERATORS = "required_operators.config"


def convert_to_ort(onnx_folder: Path, out: Path) -> None:
    """Every .onnx file of ``onnx_folder`` as .ort in ``out``, plus the operators config. Raises KeelError."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxruntime.tools.convert_onnx_models_to_ort",
            "--optimization_style",
            "Fixed",
            "--output_dir",
            str(out),
            str(onnx_folder),
        ],
        capture_output=True,
        text=True,
    )
    lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    if proc.returncode != 0 or not (out / OPERATORS).is_file():
        raise KeelError(
            f"onnxruntime's ORT-format converter failed ({lines[-1] if lines else f'exit {proc.returncode}'}); "
            "the .onnx export (`keel export RUN_DIR`) still works with full ONNX Runtime"
        )


def write_mobile_folder(
    model,
    tokenizer,
    labels: list[str],
    dest: Path,
    texts: list[str],
    *,
    max_len: int,
    info: dict | None = None,
    atol: float = 1e-4,
    min_cosine: float = 0.99,
) -> dict:
    """The mobile folder for ``model`` (a Hugging Face sequence classifier) at ``dest``, written atomically."""
    model = model.float().eval()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(dest) as tmp, tempfile.TemporaryDirectory(dir=dest.parent, prefix=".onnx-") as scratch:
        onnx_folder = Path(scratch)
        figures, checks = write_standard_graph(model, tokenizer, texts, onnx_folder, max_len, atol, min_cosine)
        convert_to_ort(onnx_folder, tmp)
        for name in MODELS:  # loaded back: the .ort model must answer as its .onnx source does
            ort, src = session(tmp / f"{name}.ort"), session(onnx_folder / f"{name}.onnx")
            diff = max(float(np.abs(ort.run(None, f)[0] - src.run(None, f)[0]).max()) for f in checks)
            if not diff <= atol:
                raise KeelError(
                    f"{name}.ort does not match its ONNX graph (max |diff| {diff:.2e} > {atol:g}); "
                    "use the .onnx export with full ONNX Runtime"
                )
            figures[f"{name}.ort_max_abs_diff_vs_onnx"] = diff
        for stray in tmp.glob("*.onnx"):  # the converter may leave an optimized copy beside its output
            stray.unlink()
        config = tmp / OPERATORS  # its header names the models by their path at conversion: keep the names only
        config.write_text(
            "".join(
                f"# - {Path(line[4:].strip()).name}\n" if line.startswith("# - ") else line + "\n"
                for line in config.read_text().splitlines()
            )
        )
        write_model_files(model, tokenizer, labels, tmp, max_len)
        meta = {**(info or {}), "variant": MOBILE, "labels": labels, "max_length": max_len, **figures}
        (tmp / "keel.json").write_text(json.dumps(meta, indent=2))
    figures["bytes"] = {f"{n}.ort": (dest / f"{n}.ort").stat().st_size for n in MODELS}
    figures["operators"] = sum(  # lines "domain;opset;Op1,Op2,..."
        len(line.split(";")[2].split(","))
        for line in (dest / OPERATORS).read_text().splitlines()
        if line and line[0] != "#"
    )
    return figures


@writes_run
def export_mobile(run_dir: str | Path, atol: float = 1e-4, min_cosine: float = 0.99) -> dict:
    """runs/<name>/export/mobile/ from the run's final model; returns the parity figures and sizes."""
    return export_classifier(run_dir, MOBILE, write_mobile_folder, atol=atol, min_cosine=min_cosine)
