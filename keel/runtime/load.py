"""Loading a finished run's model in any of its variants (checksums first, sealed folders opened in memory),
and running it on texts. Everything that scores a model (evaluate, compress, export, bench, audit, serve)
loads it through here."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from keel.errors import CheckpointError, KeelError
from keel.io import verify_manifest
from keel.recipe import Recipe, load_recipe, validate_recipe
from keel.rundir import export_dir, variant_location

logger = logging.getLogger(__name__)


@dataclass
class Trained:
    model: object
    tokenizer: object
    info: dict  # keel.json
    recipe: Recipe
    run_dir: Path


BACKENDS = ("torch", "onnx", "onnx-int8", "onnx-static-int8", "torchao-weight-only", "torchao-dynamic")


def load_trained(run_dir: str | Path, backend: str = "torch") -> Trained:
    """The final model of a run, one of its exports, or a compressed variant (``student-onnx-int8``, ...).
    Every file is checked against its manifest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise KeelError(f"run directory '{run_dir}' not found; pass the folder `keel run` printed (see runs/)")
    if backend not in BACKENDS:
        run_dir, backend = variant_location(run_dir, backend)
        if backend not in BACKENDS:
            raise KeelError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        if not run_dir.is_dir():
            raise CheckpointError(f"{run_dir} does not exist; run `keel compress` (or distill/prune) first")
    folder = run_dir / "model"
    if not folder.is_dir():
        raise CheckpointError(
            f"{run_dir} has no final model yet (model/ is missing); finish training with `keel train RECIPE --resume`"
        )
    info = verified_model(run_dir)
    recipe = sealed_recipe(run_dir, info)
    from transformers import AutoTokenizer

    from keel.secure import memory
    from keel.secure.seal import is_sealed, open_folder
    from keel.tasks import get_task

    sealed = is_sealed(folder)  # decrypted in memory with $KEEL_SEAL_KEY (or its key file); nothing plain on disk
    if backend.startswith("onnx"):
        from keel.runtime.ort import OnnxClassifier

        onnx_folder = export_dir(run_dir, backend)
        if not onnx_folder.is_dir():
            raise CheckpointError(f"{run_dir} has no {backend} export yet; run `keel export {run_dir}` first")
        model = OnnxClassifier(onnx_folder)
        tokenizer = memory.tokenizer(model.files) if model.files else AutoTokenizer.from_pretrained(folder)
    elif sealed:
        if info.get("resized"):
            raise KeelError(
                f"{folder} is sealed and structurally pruned, which in-memory opening does not cover; run "
                f"`keel unseal {run_dir}` to use it"
            )
        files = open_folder(folder)
        tokenizer = memory.tokenizer(files)
        model = memory.hf_model(files)
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = get_task(info["task"]).build_model(folder, info.get("labels") or [])
        if backend.startswith("torchao-"):
            from keel.runtime.int8 import torchao_int8

            model = torchao_int8(model, backend.removeprefix("torchao-"))
    model.eval()
    return Trained(model, tokenizer, info, recipe, run_dir)


def verified_model(run_dir: Path) -> dict:
    """Check RUN/model against its manifest (every file, and no file it does not list); returns its keel.json."""
    folder = Path(run_dir) / "model"
    verify_manifest(folder)
    return json.loads((folder / "keel.json").read_text())


SEALED_SECTIONS = {"task", "model"}  # what decides how a trained model is run


def sealed_recipe(run_dir: Path, info: dict) -> Recipe:
    """The run's recipe, checked against the one the model was sealed with (in model/keel.json).

    The sections that decide how the model is run (``task``, ``model``: max_length, ...) must say what was sealed: an
    edited or missing recipe.yaml is refused, never silently used or ignored. The sections of later stages (audit,
    compress, serve) may be edited in the run's recipe.yaml between stages, as before."""
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing; restore it (the model in {Path(run_dir) / 'model'} was sealed with "
            "its recipe) or train a new run"
        )
    current = load_recipe(path)
    if "recipe" not in info:  # sealed by an older keel: the recipe's hash in keel.json covers it
        if info.get("recipe_sha256") != current.sha256():
            raise CheckpointError(
                f"{path} is not the recipe {Path(run_dir) / 'model'} was sealed with (sha256 "
                f"{current.sha256()[:12]} vs {str(info.get('recipe_sha256'))[:12]}); restore it or "
                "train a new run"
            )
        return current
    sealed = validate_recipe(info["recipe"], source=f"{Path(run_dir) / 'model' / 'keel.json'} recipe")
    changed = _first_change(
        sealed.model_dump(mode="json", include=SEALED_SECTIONS),
        current.model_dump(mode="json", include=SEALED_SECTIONS),
    )
    if changed:
        key, old, new = changed
        raise CheckpointError(
            f"{path} was changed after the model was sealed: {key} is {new!r} there and {old!r} in "
            f"the recipe sealed in {Path(run_dir) / 'model' / 'keel.json'}; restore it, or train a "
            "new run with the new settings"
        )
    return current


def _first_change(old: dict, new: dict, prefix: str = "") -> tuple[str, object, object] | None:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_change(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}", a, b
    return None


def text_logits(t: Trained, texts: list[str]):
    """Logits (B, C) for raw texts, through whichever backend ``t`` was loaded with."""
    import torch

    enc = t.tokenizer(texts, truncation=True, max_length=t.recipe.model.max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        return t.model(**enc).logits.float()


def batched_logits(t: Trained, texts: list[str], batch_size: int = 32):
    """Logits (N, C) in the order given, computed on batches of texts of similar length (less padding)."""
    import torch

    from keel.tasks.classification import length_batches

    texts = list(texts)
    lengths = (
        [len(ids) for ids in t.tokenizer(texts, truncation=True, max_length=t.recipe.model.max_length)["input_ids"]]
        if texts
        else []
    )
    out = [None] * len(texts)
    for idx in length_batches(lengths, batch_size):
        for i, row in zip(idx, text_logits(t, [texts[i] for i in idx])):
            out[i] = row
    return torch.stack(out) if out else torch.zeros((0, len(t.info.get("labels") or [])))
