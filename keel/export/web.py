"""`keel export RUN_DIR --target web`: a folder any JavaScript app loads with Transformers.js, and a demo page.

    runs/<name>/export/web/
        config.json, tokenizer.json, tokenizer_config.json, ...  what Transformers.js reads (labels in id2label)
        onnx/model.onnx                 fp32, one file, the standard padded graph
        onnx/model_quantized.onnx       dynamic int8 (Transformers.js ``dtype: "q8"``, the page's default)
        index.html                      classifies typed text in the browser tab; nothing is sent anywhere
        vendor/                         Transformers.js and ONNX Runtime Web's WASM build (from the npm registry)
        serve.py                        serves the folder with the cross-origin isolation headers (WASM threads)
        keel.json, manifest.json

The graph takes what Transformers.js feeds (``input_ids``, ``attention_mask`` and ``token_type_ids`` where the
tokenizer makes them), padded: keel's padding-free graph (`keel.export.packed`) is for keel's own runtime. Parity
is checked as for every export: fp32 against eager PyTorch within ``atol``, int8 by the logits' cosine.

The JavaScript files come from the web runtime folder, filled once from the npm registry by `make web-runtime`
(versions locked in web_assets/package-lock.json); the export itself never touches the network, and refuses
with one line naming that target when the folder is missing. The page does not apply fairness thresholds
(`keel audit`'s ThresholdOptimizer): it shows the model's own probabilities.
"""

from __future__ import annotations

import html
import json
import os
import shutil
from pathlib import Path

import numpy as np

from keel.errors import KeelError
from keel.export.onnx import _feeds, export_classifier, input_names, parity_batches, quantize_graph, write_graph
from keel.io import atomic_dir, cache_dir, writes_run

WEB = "web"
ASSETS = Path(__file__).with_name("web_assets")
# vendored name -> its path under the runtime's node_modules/. transformers.min.js bundles ONNX Runtime Web's
# JavaScript; the asyncify WASM build beside it is the one that bundle loads.
VENDORED = {
    "transformers.min.js": "@huggingface/transformers/dist/transformers.min.js",
    "ort-wasm-simd-threaded.asyncify.mjs": "onnxruntime-web/dist/ort-wasm-simd-threaded.asyncify.mjs",
    "ort-wasm-simd-threaded.asyncify.wasm": "onnxruntime-web/dist/ort-wasm-simd-threaded.asyncify.wasm",
}


def runtime_dir() -> Path:
    """Where `make web-runtime` puts the npm packages: $KEEL_WEB_RUNTIME, else <keel cache>/web-runtime."""
    return Path(os.environ.get("KEEL_WEB_RUNTIME") or cache_dir() / "web-runtime")


def runtime_files(root: Path | None = None) -> dict[str, Path]:
    """The files vendored into a web export, by their name there. Raises KeelError when the runtime is absent."""
    root = runtime_dir() if root is None else Path(root)
    files = {name: root / "node_modules" / rel for name, rel in VENDORED.items()}
    missing = [name for name, p in files.items() if not p.is_file()]
    if missing:
        raise KeelError(
            f"the web runtime is not in {root} ({missing[0]} is missing); run `make web-runtime` once with "
            "network access (it fetches Transformers.js from the npm registry), or set KEEL_WEB_RUNTIME to a "
            "folder where it ran"
        )
    return files


def runtime_versions(root: Path | None = None) -> dict[str, str]:
    root = runtime_dir() if root is None else Path(root)
    out = {}
    for package in ("@huggingface/transformers", "onnxruntime-web"):
        meta = json.loads((root / "node_modules" / package / "package.json").read_text())
        out[package] = meta["version"]
    return out


def write_standard_graph(
    model, tokenizer, texts: list[str], folder: Path, max_len: int, atol: float, min_cosine: float
):
    """``folder``/model.onnx (fp32, one file) and ``folder``/model_quantized.onnx (int8) of the padded graph.

    Returns (figures, the parity feeds). Raises KeelError when either drifts from eager PyTorch."""
    names = input_names(tokenizer)
    checks, eager = parity_batches(model, tokenizer, texts, names, max_len)
    diff = write_graph(model, folder / "model.onnx", checks, eager, names, max_len, atol, external_data=False)
    cos = quantize_graph(folder / "model.onnx", folder / "model_quantized.onnx", checks, eager, min_cosine)
    return {"inputs": names, "max_abs_diff_vs_eager": diff, "int8_logit_cosine_vs_eager": cos}, checks


def write_model_files(model, tokenizer, labels: list[str], folder: Path, max_len: int) -> None:
    """config.json with the labels by name, and the tokenizer truncating where keel's own predictions do."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    config.save_pretrained(folder)
    tokenizer.model_max_length = max_len
    tokenizer.save_pretrained(folder)


def write_web_folder(
    model,
    tokenizer,
    labels: list[str],
    dest: Path,
    texts: list[str],
    *,
    max_len: int,
    title: str,
    info: dict | None = None,
    runtime: Path | None = None,
    atol: float = 1e-4,
    min_cosine: float = 0.99,
) -> dict:
    """The web folder for ``model`` (a Hugging Face sequence classifier) at ``dest``, written atomically."""
    files = runtime_files(runtime)
    model = model.float().eval()
    with atomic_dir(dest) as tmp:
        (tmp / "onnx").mkdir()
        figures, _ = write_standard_graph(model, tokenizer, texts, tmp / "onnx", max_len, atol, min_cosine)
        write_model_files(model, tokenizer, labels, tmp, max_len)
        page = (ASSETS / "index.html").read_text().replace("__TITLE__", html.escape(title))
        (tmp / "index.html").write_text(page)
        shutil.copy2(ASSETS / "serve.py", tmp / "serve.py")
        (tmp / "vendor").mkdir()
        for name, src in files.items():
            shutil.copy2(src, tmp / "vendor" / name)
        meta = {**(info or {}), "variant": WEB, "labels": labels, "max_length": max_len, **figures}
        meta["runtime"] = runtime_versions(runtime)
        (tmp / "keel.json").write_text(json.dumps(meta, indent=2))
    figures["bytes"] = {p: (dest / "onnx" / p).stat().st_size for p in ("model.onnx", "model_quantized.onnx")}
    return figures


@writes_run
def export_web(run_dir: str | Path, atol: float = 1e-4, min_cosine: float = 0.99) -> dict:
    """runs/<name>/export/web/ from the run's final model; returns the parity figures and sizes."""
    runtime_files()  # refused before a model is loaded
    return export_classifier(
        run_dir, WEB, write_web_folder, lambda t: {"title": str(t.recipe.name)}, atol=atol, min_cosine=min_cosine
    )


def ort_probabilities(onnx_path: Path, tokenizer, texts: list[str], max_len: int, batch: int = 32) -> np.ndarray:
    """Class probabilities (N, C) from Python ONNX Runtime: the oracle the browser and Node are checked against."""
    from keel.runtime.ort import session

    sess = session(onnx_path)
    names = [i.name for i in sess.get_inputs()]
    out = []
    for i in range(0, len(texts), batch):
        logits = sess.run(None, _feeds(tokenizer, texts[i : i + batch], names, max_len))[0]  # (B, C)
        z = np.exp(logits - logits.max(-1, keepdims=True))
        out.append(z / z.sum(-1, keepdims=True))
    return np.concatenate(out)
