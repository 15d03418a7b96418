"""ONNX export of a run's classifier, checked against eager PyTorch every time, and ONNX Runtime int8.

    runs/<name>/export/onnx/        model.onnx + model.onnx.data (fp32), tokenizer, keel.json, manifest.json
    runs/<name>/export/onnx-int8/   the same, weights int8 (onnxruntime.quantization.quantize_dynamic)

The export uses torch's dynamo exporter with dynamic batch and sequence axes. BERT-style classifiers are exported
through `keel.export.packed` (every per-token layer runs on the real tokens only, not on the padding; keel.json
says ``"packed": true``); other models as they are. Parity is measured on
texts from the run's own data, padded to several lengths: fp32 must match eager within ``atol`` and int8
must keep the logits' cosine similarity at or above ``min_cosine``; otherwise nothing is written.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np

from keel.errors import KeelError
from keel.io import atomic_dir, writes_run
from keel.rundir import export_dir
from keel.runtime.ort import session as _session

FP32, INT8, STATIC_INT8 = "onnx", "onnx-int8", "onnx-static-int8"


def _parity_texts(trained, n: int = 16) -> list[str]:
    """Texts of different lengths from the run's data; a fixed fallback if the data is gone."""
    try:
        from keel.data.prepare import prepare_data

        data = prepare_data(trained.recipe, trained.tokenizer, trained.run_dir)
        ds = data.splits["validation"] if len(data.splits["validation"]) else data.splits["train"]
        texts = ds[:n]["text"]
    except KeelError:
        texts = []
    return texts or ["a short one", "a somewhat longer sentence to check padding and masking", "x"]


def _feeds(tokenizer, texts: list[str], names: list[str], max_length: int) -> dict:
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="np")
    return {n: enc[n].astype(np.int64) for n in names}


def parity_batches(
    model, tokenizer, texts: list[str], names: list[str], max_len: int, spans=((0, 1), (1, 3), (0, None))
) -> tuple[list[dict], list[np.ndarray]]:
    """Feeds of ``texts[start : start + count]`` for each (start, count) of ``spans`` (None: to the end), so several
    batch sizes and padded lengths exercise the dynamic axes, and eager PyTorch's logits on each."""
    import torch

    feeds = [_feeds(tokenizer, texts[at : None if n is None else at + n], names, max_len) for at, n in spans]
    with torch.no_grad():
        eager = [model(**{k: torch.from_numpy(v) for k, v in f.items()}).logits.numpy() for f in feeds]
    return feeds, eager


@contextlib.contextmanager
def _quiet():
    """The exporter and quantizer narrate to stdout, warnings and the root logger; keep the terminal readable."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def input_names(tokenizer) -> list[str]:
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in tokenizer.model_input_names:
        names.append("token_type_ids")
    return names


def load_classifier(run_dir: str | Path):
    """The run's final model for an export: refused for a sealed run (no plain copy is written) or another task."""
    from keel.runtime.load import load_trained
    from keel.secure.seal import refuse_plain_outputs

    refuse_plain_outputs(run_dir, "export")
    t = load_trained(run_dir)
    if t.info["task"] != "classification":
        raise KeelError(f"keel export handles classification runs for now; {run_dir} is a {t.info['task']} run")
    return t


def export_classifier(run_dir: str | Path, variant: str, write, from_run=None, **options) -> dict:
    """RUN/export/<variant>/ from the run's final classifier, by a target's ``write(model, tokenizer, labels, dest,
    texts, max_len=, info=, **options)``: it checks parity, writes a temporary folder and moves it into place.
    ``from_run(trained)`` returns the options read from the loaded run. Returns the figures and the folder."""
    t = load_classifier(run_dir)
    dest = export_dir(run_dir, variant)
    options |= from_run(t) if from_run else {}
    labels, texts = list(t.info["labels"]), _parity_texts(t)
    figures = write(
        t.model, t.tokenizer, labels, dest, texts, max_len=t.recipe.model.max_length, info=t.info, **options
    )
    return {**figures, "folder": str(dest)}


@writes_run
def export_onnx(
    run_dir: str | Path, atol: float = 1e-4, min_cosine: float = 0.99, int8: bool = True, pack: bool = True
) -> dict:
    """Export the run's final model; returns the parity figures and sizes.

    ``pack``: export a BERT-style classifier as the padding-free graph of `keel.export.packed` (the same logits;
    False exports the padded graph, as a benchmark's point of comparison)."""

    from keel.export.packed import PackedBertClassifier, can_pack

    t = load_classifier(run_dir)
    model, tok = t.model.float().eval(), t.tokenizer
    names = input_names(tok)
    texts = _parity_texts(t)
    max_len = t.recipe.model.max_length
    checks, eager = parity_batches(model, tok, texts, names, max_len)

    packed = pack and can_pack(model) and tok.padding_side == "right"  # a packed row's first token is its [CLS]
    graph = PackedBertClassifier(model) if packed else model
    result: dict = {"inputs": names, "parity_batches": [f["input_ids"].shape for f in checks], "packed": packed}
    fp32 = export_dir(run_dir, FP32)
    with atomic_dir(fp32) as tmp:
        diff = write_graph(graph, tmp / "model.onnx", checks, eager, names, max_len, atol)
        _copy_metadata(t, tmp, {"variant": FP32, "max_abs_diff_vs_eager": diff, "inputs": names, "packed": packed})
    result[FP32] = {"max_abs_diff_vs_eager": diff, "bytes": weights_bytes(fp32)}
    if int8:
        result[INT8] = quantize_int8(run_dir, checks, eager, min_cosine)
    return result


def write_graph(
    graph,
    path: Path,
    checks: list[dict],
    eager: list[np.ndarray],
    names: list[str],
    max_len: int,
    atol: float,
    external_data: bool = True,
) -> float:
    """``graph`` to ONNX at ``path`` (dynamic batch and sequence axes, ``logits`` out); returns the max |diff| to
    ``eager`` on the ``checks`` feeds. Raises KeelError (and the caller's atomic folder is dropped) above ``atol``."""
    import torch

    example = tuple(torch.from_numpy(checks[-1][n]) for n in names)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=max(max_len, 8))
    with _quiet():
        torch.onnx.export(
            graph,
            example,
            str(path),
            input_names=names,
            output_names=["logits"],
            dynamic_shapes={n: {0: batch, 1: seq} for n in names},
            dynamo=True,
            external_data=external_data,
            verbose=False,
        )
    diff = max(float(np.abs(_session(path).run(None, f)[0] - e).max()) for f, e in zip(checks, eager))
    if not diff <= atol:
        raise KeelError(
            f"ONNX export does not match PyTorch: max |diff| {diff:.2e} > atol {atol:g}; "
            "report this model type, and serve it with the PyTorch backend meanwhile"
        )
    return diff


def quantize_int8(run_dir: str | Path, checks: list[dict], eager: list[np.ndarray], min_cosine: float) -> dict:
    """Dynamic int8 (weights int8, activations quantized on the fly) with ONNX Runtime's quantizer."""
    src = export_dir(run_dir, FP32)
    final = export_dir(run_dir, INT8)
    with atomic_dir(final) as tmp:
        cos = quantize_graph(src / "model.onnx", tmp / "model.onnx", checks, eager, min_cosine)
        _copy_beside(src, tmp, {"variant": INT8, "logit_cosine_vs_eager": cos})
    return {"logit_cosine_vs_eager": cos, "bytes": weights_bytes(final)}


def quantize_graph(src: Path, dst: Path, checks: list[dict], eager: list[np.ndarray], min_cosine: float) -> float:
    """Dynamic int8 of the graph ``src`` at ``dst``; returns the logits' cosine to ``eager`` on ``checks`` (the worst
    batch). Raises KeelError below ``min_cosine``.

    Weights get a scale per output channel: one scale per matrix (per tensor) was as accurate on the demo's
    deployable model but no faster by CPU time (benchmarks/README.md), so the finer scales stay."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)
    session = _session(dst)
    cos = min(_cosine(session.run(None, f)[0], e) for f, e in zip(checks, eager))
    if not cos >= min_cosine:
        raise KeelError(
            f"int8 ONNX logits drift too far from fp32 (cosine {cos:.4f} < {min_cosine}); "
            "keep the fp32 export for this model"
        )
    return cos


def quantize_static_int8(run_dir: str | Path, calibration_samples: int = 128, min_cosine: float = 0.99) -> dict:
    """Static int8 (QDQ): activation ranges calibrated once on training texts, so no ranges are computed at run time.

    Only MatMul/Gemm are quantized; softmax and layer norms stay fp32 (quantizing them costs a transformer its
    accuracy for little speed). Checked like the dynamic variant: logit cosine vs eager >= ``min_cosine``.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from keel.runtime.load import load_trained

    src = export_dir(run_dir, FP32)
    if not (src / "model.onnx").is_file():
        raise KeelError(f"{run_dir} has no fp32 ONNX export to calibrate; run `keel export {run_dir}` first")
    t = load_trained(run_dir)
    names, max_len = input_names(t.tokenizer), t.recipe.model.max_length
    texts = _parity_texts(t, n=calibration_samples + 16)
    calib, check = texts[16:] or texts, texts[:16]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(
                [_feeds(t.tokenizer, calib[i : i + 8], names, max_len) for i in range(0, len(calib), 8)]
            )

        def get_next(self):
            return next(self.batches, None)

    final = export_dir(run_dir, STATIC_INT8)
    with atomic_dir(final) as tmp:
        with _quiet():
            quantize_static(
                str(src / "model.onnx"),
                str(tmp / "model.onnx"),
                Reader(),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["MatMul", "Gemm"],
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                extra_options={"ActivationSymmetric": True},
            )
        feeds, eager = parity_batches(t.model.float(), t.tokenizer, check, names, max_len, spans=((0, 1), (0, None)))
        session = _session(tmp / "model.onnx")
        cos = min(_cosine(session.run(None, f)[0], e) for f, e in zip(feeds, eager))
        if not cos >= min_cosine:
            raise KeelError(
                f"static int8 ONNX logits drift too far from fp32 (cosine {cos:.4f} < {min_cosine}); "
                "use dynamic int8 (compress.quantize.onnx_static_int8=false)"
            )
        _copy_beside(src, tmp, {"variant": STATIC_INT8, "logit_cosine_vs_eager": cos, "calibration_texts": len(calib)})
    return {"logit_cosine_vs_eager": cos, "bytes": weights_bytes(final)}


def _copy_beside(src: Path, dst: Path, extra: dict) -> None:
    """A quantized export's companions: the fp32 export's tokenizer files, and its keel.json plus ``extra``."""
    for p in src.iterdir():
        if p.name not in ("model.onnx", "model.onnx.data", "manifest.json", "keel.json"):
            shutil.copy2(p, dst / p.name)
    meta = json.loads((src / "keel.json").read_text())
    (dst / "keel.json").write_text(json.dumps({**meta, **extra}, indent=2))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of a batch's logits taken as one vector: per-row cosines of near-zero logits say little."""
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def _copy_metadata(t, folder: Path, extra: dict) -> None:
    t.tokenizer.save_pretrained(folder)
    (folder / "keel.json").write_text(json.dumps({**t.info, **extra}, indent=2))


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("model.onnx*"))
