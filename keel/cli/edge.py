"""`keel export RUN_DIR --target web|mobile`: a classifier for the browser (Transformers.js) and for ORT Mobile.

The `export` verb itself lives with the ONNX export (keel/cli/compress.py) and hands these targets to here.
"""

from __future__ import annotations

from keel.errors import KeelError
from keel.progress import esc, out

TARGETS = ("onnx", "web", "mobile")


def export_edge(run_dir: str, target: str) -> None:
    if target not in TARGETS:
        raise KeelError(f"--target must be one of {', '.join(TARGETS)}; got {target!r}")
    if target == "web":
        from keel.export.web import export_web

        result = export_web(run_dir)
        folder = result["folder"]
        sizes = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in result["bytes"].items())
        out.print(
            f"{esc(folder)}: {sizes}; max |logit diff| vs PyTorch {result['max_abs_diff_vs_eager']:.1e}, "
            f"int8 logit cosine {result['int8_logit_cosine_vs_eager']:.4f}"
        )
        out.print(
            f"open it offline: python {esc(folder)}/serve.py, then http://127.0.0.1:8000/ (its cross-origin "
            "isolation headers let WASM use several threads; any static file server works, on one thread)"
        )
    elif target == "mobile":
        from keel.export.mobile import OPERATORS, export_mobile

        result = export_mobile(run_dir)
        folder = result["folder"]
        sizes = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in result["bytes"].items())
        out.print(f"{esc(folder)}: {sizes}, loaded back in ONNX Runtime; {result['operators']} operators")
        out.print(
            f"a reduced ONNX Runtime build for the app: build.py --minimal_build "
            f"--include_ops_by_config {esc(folder)}/{OPERATORS}"
        )
