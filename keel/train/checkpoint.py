"""Checkpoints that a killed run can resume from exactly, and never mistakes for complete.

One checkpoint is a folder ``checkpoints/step-00000042/``:

    model.safetensors        weights (tied tensors handled by safetensors.torch.save_model)
    optimizer.safetensors    every optimiser state tensor, flattened
    state.json               step, epoch, position in the epoch, scheduler, optimiser groups,
                             early-stopping state, python/numpy RNG, the resolved recipe and its hash
    rng-rank<R>.safetensors  torch (and CUDA) RNG of each process
    manifest.json            SHA-256 of every file above, written last

It is written into a temporary sibling and renamed into place (io.atomic_dir): a folder named
``step-*`` always has its manifest, and a load checks every hash first. No pickle anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from keel.errors import CheckpointError
from keel.io import IntegrityError, atomic_dir, verify_manifest

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainState:
    """Everything besides tensors that the loop needs to continue where it stopped."""

    step: int = 0  # optimiser steps done
    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed
    samples_seen: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    finished: bool = False
    extra: dict = field(default_factory=dict)  # for later stages (e.g. the privacy accountant)


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (named step-*, manifest present), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "manifest.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def clean_partial(root: Path) -> int:
    """Remove temporary folders left by a write that was killed; returns how many."""
    root = Path(root)
    if not root.is_dir():
        return 0
    stale = [p for p in root.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)


def capture_rng() -> tuple[dict, dict]:
    """(tensors, json) for every RNG a step can touch: python, numpy, torch CPU and CUDA."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors["numpy.keys"] = torch.from_numpy(np.asarray(np_keys, dtype=np.uint32).astype(np.int64))
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [np_kind, int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    return tensors, meta


def restore_rng(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy.keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


def _flatten_optimizer(opt_state: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for idx, pstate in opt_state["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _linked(src: Path, dst: Path) -> bool:
    """A hard link at ``dst`` to ``src``; False where the filesystem cannot link."""
    try:
        os.link(src, dst)
    except OSError:
        return False
    return True


def save_checkpoint(
    root: Path,
    model,
    optimizer,
    scheduler,
    state: TrainState,
    recipe_yaml: str,
    recipe_sha256: str,
    rank_rng: list[tuple[dict, dict]],
    weights_from: Path | None = None,
) -> Path:
    """Write one complete checkpoint atomically. ``rank_rng`` holds every process's RNG state. ``weights_from``: a
    sealed model.safetensors of these very weights (the best model, saved at this step): hard-linked, not written
    again (files are never changed in place, so the two folders cannot diverge); written where links fail."""
    final = step_dir(root, state.step)
    with atomic_dir(final) as tmp:
        if weights_from is None or not _linked(weights_from, tmp / "model.safetensors"):
            save_model(model, str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_meta = []
        for rank, (tensors, meta) in enumerate(rank_rng):
            save_file(tensors, str(tmp / f"rng-rank{rank}.safetensors"))
            rng_meta.append(meta)
        doc = {
            "format": "keel-checkpoint/1",
            "state": asdict(state),
            "optimizer": opt_meta,
            "scheduler": scheduler.state_dict(),
            "rng": rng_meta,
            "recipe_sha256": recipe_sha256,
            "world_size": len(rank_rng),
        }
        (tmp / "state.json").write_text(json.dumps(doc))
        (tmp / "recipe.yaml").write_text(recipe_yaml)
    return final


def prune_checkpoints(root: Path, keep_last_k: int) -> None:
    for old in list_checkpoints(root)[:-keep_last_k]:
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class Loaded:
    state: TrainState
    optimizer: dict
    scheduler: dict
    rng: tuple[dict, dict]
    recipe_yaml: str
    recipe_sha256: str
    path: Path
    changed: list[str] | None = None  # settings that differ from the checkpoint's (resume_point's check)
    world_size: int | None = None  # processes that wrote it, where it may differ from this run's (sharded)


def load_checkpoint(path: Path, model, rank: int = 0, world_size: int = 1, verify: bool = True) -> Loaded:
    """Verify every file's hash, then load weights into ``model`` and return the rest."""
    if verify:
        verify_manifest(path)
    doc = json.loads((path / "state.json").read_text())
    if doc.get("world_size", 1) != world_size:
        raise CheckpointError(
            f"{path} was written by {doc.get('world_size')} processes and this run has {world_size}; "
            "resume with the same number of processes"
        )
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = next(
            (ln.strip() for ln in first if "size mismatch" in ln or "Missing" in ln), first[-1] if first else ""
        )
        raise CheckpointError(
            f"{path}: the weights do not fit this model ({detail[:160]}); "
            "resume with the recipe's original model section"
        ) from None
    opt_meta = doc["optimizer"]
    optimizer = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), opt_meta)
    rng = (load_file(str(path / f"rng-rank{rank}.safetensors")), doc["rng"][rank])
    return Loaded(
        TrainState(**doc["state"]),
        optimizer,
        doc["scheduler"],
        rng,
        (path / "recipe.yaml").read_text(),
        doc["recipe_sha256"],
        path,
    )


def resume_point(root: Path, model, recipe, rank: int = 0, world_size: int = 1, check=None, load=None) -> Loaded | None:
    """The newest checkpoint that is intact, loaded into ``model``; older ones are tried when a newer one is
    corrupt (each skipped one is named, with the reason). None when nothing was checkpointed.

    ``check(saved_recipe_yaml, recipe)`` runs on an intact checkpoint before its weights are loaded (a changed
    model is then named as the field that changed, not as a shape mismatch); its error is not a reason to fall
    back, nor is a checkpoint that does not fit the model: only a checkpoint whose files fail their manifest is.
    ``load(path)`` reads a verified checkpoint (default: this module's format; keel/train/sharded.py passes its own).
    """
    if load is None:

        def load(path: Path) -> Loaded:
            return load_checkpoint(path, model, rank=rank, world_size=world_size, verify=False)

    found = list_checkpoints(root)
    skipped = []
    for path in reversed(found):
        try:
            verify_manifest(path)
        except IntegrityError as e:
            skipped.append(f"{path.name} ({e})")
            logger.warning(f"skipping checkpoint {path.name}: {e}")
            continue
        changed = check((path / "recipe.yaml").read_text(), recipe) if check is not None else None
        loaded = load(path)
        loaded.changed = changed
        if skipped:
            logger.info(
                f"resuming from {path.name}, the newest intact checkpoint ({len(skipped)} newer one(s) skipped)"
            )
        return loaded
    if skipped:
        raise CheckpointError(
            f"no intact checkpoint in {root} to resume from: {'; '.join(skipped)}; restore one, or "
            f"remove {root} to start the run afresh with --resume"
        )
    return None
