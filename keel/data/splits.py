"""The splits a run was trained on, frozen in its run directory so every later stage reads the same rows.

    runs/<name>/splits/   train.parquet, validation.parquet, test.parquet (text, label, group), splits.json,
                          manifest.json (SHA-256 of each file, written last; the folder is renamed into place)

Training writes the folder once, from ``data.path`` / ``data.name`` (curated first when the recipe has
``data.curate``: keel/data/curate, whose report curate.json is frozen beside the rows); a resumed run, evaluation, the audit, the
bench, the ONNX parity check, vocabulary pruning and the report read it and never the source again, so an
edited, moved or deleted source cannot give new splits that overlap the training data, and a run can be
evaluated from any folder. The texts themselves are stored (not row ids): the rows need no source to be
read, and the file is the size of the (capped) data. A source that changed since the freeze is only a warning,
and only when training continues (``--resume``); a compression stage (``compress/<stage>/``) reads the splits
of the run it belongs to, or its own when it froze a larger transfer set (keel/compress/transfer.py). Runs written before splits were frozen re-split their source, and refuse when its
content hash differs from the one recorded at training time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from keel.data.load import RawSplits, load_splits
from keel.errors import DataError
from keel.io import MANIFEST, atomic_dir, verify_manifest
from keel.progress import is_main_process
from keel.recipe import Recipe
from keel.rundir import SPLITS, splits_dir

logger = logging.getLogger(__name__)

FORMAT = "keel-splits/1"
NAMES = ("train", "validation", "test")


def freeze(run_dir: str | Path, raw: RawSplits, curated: Path | None = None) -> Path:
    """Write ``raw`` as RUN_DIR/splits (atomic, sealed with a manifest); with ``curated`` (the cache folder of
    keel/data/curate), also its report (curate.json, read by the report) and label probabilities."""
    final = Path(run_dir) / SPLITS
    with atomic_dir(final) as tmp:
        if curated is not None:
            from keel.data.curate import CURATE_JSON, PROBS_FILE

            for name in (CURATE_JSON, PROBS_FILE):
                if (curated / name).is_file():
                    shutil.copyfile(curated / name, tmp / name)
        for name in NAMES:
            getattr(raw, name).to_parquet(tmp / f"{name}.parquet", index=False)
        doc = {
            "format": FORMAT,
            "source": raw.source,
            "source_sha256": raw.content_sha256,
            "labels": raw.labels,
            "notes": raw.notes,
            "counts": {s: len(getattr(raw, s)) for s in NAMES},
        }
        (tmp / "splits.json").write_text(json.dumps(doc, indent=2))
    return final


def load_frozen(run_dir: str | Path) -> RawSplits:
    """The frozen splits of a run, checked against their manifest; DataError naming the folder if absent."""
    folder = splits_dir(run_dir)
    if folder is None:
        raise DataError(f"{run_dir} has no frozen splits ({SPLITS}/); it was trained by an older keel or not at all")
    return _read(folder)


def _read(folder: Path) -> RawSplits:
    import pandas as pd

    manifest = verify_manifest(folder)  # CheckpointError names the edited or missing file
    doc = json.loads((folder / "splits.json").read_text())
    if doc.get("format") != FORMAT:
        raise DataError(f"{folder / 'splits.json'}: unknown format {doc.get('format')!r}; re-run training")
    frames = {s: pd.read_parquet(folder / f"{s}.parquet") for s in NAMES}
    raw = RawSplits(
        frames["train"],
        frames["validation"],
        frames["test"],
        list(doc["labels"]),
        doc["source"],
        doc["source_sha256"],
        list(doc.get("notes") or []),
    )
    raw.frozen_sha256 = digest(manifest)
    return raw


def digest(manifest: dict) -> str:
    """One hash for the frozen folder: the hashes of its files, from its (verified) manifest."""
    files = {k: v["sha256"] for k, v in manifest["files"].items() if k != MANIFEST}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def run_splits(recipe: Recipe, run_dir: str | Path, freeze_missing: bool = False) -> RawSplits:
    """The splits of ``run_dir``: frozen ones when there, else (training) split the source and freeze them,
    else (a run from before frozen splits) the source re-split, if its content hash is the recorded one."""
    folder = splits_dir(run_dir)
    if folder is not None:
        raw = _read(folder)
        if freeze_missing:  # training continues on these rows; say so if the source moved on
            _warn_if_source_changed(recipe, raw)
        return raw
    if freeze_missing:
        raw = load_splits(recipe.data, recipe.task)
        curated = None
        if recipe.data.curate is not None:  # before freezing: every later stage reads the curated rows only
            from keel.data.curate import curate_splits

            raw, curated = curate_splits(raw, recipe.data.curate, recipe.task)
        if is_main_process():
            freeze(run_dir, raw, curated)
            raw = _read(Path(run_dir) / SPLITS)
        return raw
    return _legacy(recipe, Path(run_dir))


def _warn_if_source_changed(recipe: Recipe, raw: RawSplits) -> None:
    from keel.data.load import source_digest

    try:
        now, source = source_digest(recipe.data)
    except DataError:
        return  # the source is gone: nothing needs it any more
    if now != raw.content_sha256:
        logger.warning(
            f"data: {source} changed since this run froze its splits; training continues on the "
            f"frozen splits in {SPLITS}/"
        )


def _legacy(recipe: Recipe, run_dir: Path) -> RawSplits:
    recorded = None
    for d in (run_dir, run_dir.parent.parent if run_dir.parent.name == "compress" else None):
        if d is not None and (d / "train.json").is_file():
            try:
                recorded = (json.loads((d / "train.json").read_text()).get("data") or {}).get("content_sha256")
            except ValueError:
                recorded = None
            break
    raw = load_splits(recipe.data, recipe.task)
    if recorded is None or raw.content_sha256 != recorded:
        why = (
            "no content hash was recorded at training time"
            if recorded is None
            else f"its content hash is {raw.content_sha256[:12]}, training saw {recorded[:12]}"
        )
        raise DataError(
            f"{run_dir} has no frozen splits ({SPLITS}/) and its data {raw.source} cannot be shown to be "
            f"the one it was trained on ({why}); restore that file, or re-train the run"
        )
    logger.info("%s predates frozen splits; re-split its unchanged source %s", run_dir, raw.source)
    return raw
