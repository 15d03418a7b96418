"""The curation steps in order, their report (curate.json) and the content-hash cache.

PII scrubbing runs first and on every split, so nothing later (training, logs, the report's examples) sees the
original values. The other steps only remove (or relabel) rows of the training split: quality filters, exact then
near dedup, contamination (training rows that near-duplicate a validation or test row), label errors. Validation
and test rows are never removed, so the test split stays the one the source's split gave.

    ~/.cache/keel/curate/<sha256>/   train/validation/test.parquet, curate.json, [label_probs.safetensors], manifest
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from keel.data.load import RawSplits
from keel.errors import CheckpointError
from keel.io import atomic_dir, cache_dir, verify_manifest

logger = logging.getLogger(__name__)

FORMAT = "keel-curate/1"
CURATE_JSON = "curate.json"
PROBS_FILE = "label_probs.safetensors"
SPLITS = ("train", "validation", "test")
EXAMPLES = 5  # shown per step in the report
SHOWN_CHARS = 240


def curate_splits(raw: RawSplits, cfg, task: str) -> tuple[RawSplits, Path]:
    """``raw`` curated as ``cfg`` (a CurateConfig) says, and the cache folder holding the result and its report."""
    key = _key(raw, cfg, task)
    folder = cache_dir() / "curate" / key
    if folder.is_dir():
        try:
            verify_manifest(folder)
            logger.info("data.curate: cached result %s", key[:12])
            return _read(folder, raw), folder
        except (CheckpointError, OSError, ValueError):
            logger.info("data.curate: the cached result %s is damaged; curating again", key[:12])
    frames = {s: getattr(raw, s).reset_index(drop=True).copy() for s in SPLITS}
    report, probs = _run(frames, raw.labels, cfg, task)
    with atomic_dir(folder) as tmp:
        for s in SPLITS:
            frames[s].to_parquet(tmp / f"{s}.parquet", index=False)
        (tmp / CURATE_JSON).write_text(json.dumps(report, indent=2))
        if probs is not None:
            from safetensors.numpy import save_file

            save_file(probs, str(tmp / PROBS_FILE))
    return _read(folder, raw), folder


def _read(folder: Path, raw: RawSplits) -> RawSplits:
    import pandas as pd

    doc = json.loads((folder / CURATE_JSON).read_text())
    frames = {s: pd.read_parquet(folder / f"{s}.parquet") for s in SPLITS}
    return RawSplits(
        frames["train"],
        frames["validation"],
        frames["test"],
        list(raw.labels),
        raw.source,
        raw.content_sha256,
        [*raw.notes, *doc["notes"]],
    )


def _key(raw: RawSplits, cfg, task: str) -> str:
    h = hashlib.sha256(json.dumps([FORMAT, task, raw.labels, cfg.model_dump(mode="json")]).encode())
    for s in SPLITS:
        frame = getattr(raw, s)
        h.update(s.encode())
        for col in ("text", "label", "group"):
            if col in frame.columns:
                h.update(json.dumps([col, frame[col].astype(str).tolist()]).encode())
    return h.hexdigest()


def _shown(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"


def _counts(frames) -> dict:
    return {s: len(frames[s]) for s in SPLITS}


def _drop_train(frames, positions) -> None:
    train = frames["train"]
    frames["train"] = train.drop(index=train.index[list(positions)]).reset_index(drop=True)


def _run(frames, labels: list[str], cfg, task: str):
    """Every step of ``cfg`` on ``frames`` (modified in place); returns (the report, the label probabilities)."""
    steps: list[dict] = []
    report: dict = {"format": FORMAT, "config": cfg.model_dump(mode="json"), "before": _counts(frames)}
    notes: list[str] = []

    def step(name: str, before: dict, **extra) -> None:
        steps.append({"step": name, "before": before, "after": _counts(frames), **extra})

    if cfg.pii is not None:
        from keel.data.curate.pii import NOT_SCRUBBED, scrub

        before = _counts(frames)
        totals: dict[str, int] = {}
        changed_rows, examples = 0, []
        for s in SPLITS:
            texts, counts, changed = scrub(frames[s]["text"].tolist(), cfg.pii)
            frames[s]["text"] = texts
            for k, v in counts.items():
                totals[k] = totals.get(k, 0) + v
            changed_rows += len(changed)
            examples += [_shown(texts[i]) for i in changed[: EXAMPLES - len(examples)]]
        report["pii"] = {
            "counts": totals,
            "rows_changed": changed_rows,
            "examples": examples,
            "not_scrubbed": list(NOT_SCRUBBED),
        }
        step("pii", before, changed=changed_rows)
        notes.append(
            f"data.curate.pii: {sum(totals.values())} PII values replaced by typed placeholders in {changed_rows} rows"
        )

    if cfg.quality is not None:
        from keel.data.curate.quality import quality_filter

        before = _counts(frames)
        texts = frames["train"]["text"].tolist()
        drop, counts, why = quality_filter(texts, cfg.quality)
        report["quality"] = {
            "rules": counts,
            "dropped": len(drop),
            "examples": [{"text": _shown(texts[i]), "rules": why[i]} for i in drop[:EXAMPLES]],
        }
        _drop_train(frames, drop)
        step("quality", before, removed=len(drop))
        notes.append(f"data.curate.quality: dropped {len(drop)} training rows")

    if cfg.dedup is not None:
        from keel.data.curate import dedup as dd

        d = cfg.dedup
        report["dedup"] = {"examples": []}
        shown = report["dedup"]["examples"]

        def apply(name: str, found: dd.Duplicates, against: list[str]) -> None:
            texts = frames["train"]["text"].tolist()
            before = _counts(frames)
            seen = set()
            for i in found.drop:  # a few examples per kind, each text once
                if len(seen) == EXAMPLES:
                    break
                if texts[i] not in seen:
                    seen.add(texts[i])
                    shown.append(
                        {
                            "kind": name,
                            "removed": _shown(texts[i]),
                            "kept": _shown(against[found.of[i]]),
                            "similarity": round(found.similarity[i], 3),
                        }
                    )
            report["dedup"][name] = len(found.drop)
            _drop_train(frames, found.drop)
            step(name, before, removed=len(found.drop))

        if d.exact:
            texts = frames["train"]["text"].tolist()
            apply("exact", dd.exact_duplicates(texts), texts)
        if d.near:
            texts = frames["train"]["text"].tolist()
            apply("near", dd.near_duplicates(texts, d.threshold, d.shingle, d.num_perm, d.seed), texts)
        if d.contamination:
            others = frames["validation"]["text"].tolist() + frames["test"]["text"].tolist()
            found = dd.contaminated(
                frames["train"]["text"].tolist(), others, d.threshold, d.shingle, d.num_perm, d.seed
            )
            apply("contamination", found, others)
        removed = sum(report["dedup"].get(k, 0) for k in ("exact", "near", "contamination"))
        notes.append(f"data.curate.dedup: dropped {removed} duplicate or contaminating training rows")

    probs = None
    if cfg.label_errors is not None and task == "classification":
        probs = _label_errors(frames, labels, cfg.label_errors, report, step)
        notes.append(
            f"data.curate.label_errors: {report['label_errors']['found']} suspected label errors "
            f"({cfg.label_errors.action})"
        )

    if len(frames["train"]) == 0:
        from keel.errors import DataError

        raise DataError("data.curate removed every training row; loosen data.curate (or turn a step off: null)")
    report.update(steps=steps, after=_counts(frames), notes=notes)
    return report, probs


def _label_errors(frames, labels: list[str], cfg, report: dict, step) -> dict:
    import numpy as np

    from keel.data.curate.label_errors import features, find_label_issues, out_of_fold_probs

    before = _counts(frames)
    train = frames["train"]
    index = {name: i for i, name in enumerate(labels)}
    given = np.array([index[str(y)] for y in train["label"]], dtype=np.int64)
    if len(np.unique(given)) < 2 or np.bincount(given).max() < 2:
        report["label_errors"] = {"found": 0, "skipped": "too few training rows per label for k-fold probabilities"}
        return None
    texts = train["text"].tolist()
    probs = out_of_fold_probs(features(texts, cfg.features), given, cfg.folds, cfg.seed)  # (n, K)
    issues, suggested = find_label_issues(given, probs)
    at = np.flatnonzero(issues)
    order = at[np.argsort(-probs[at, suggested[at]], kind="stable")]  # most confident first
    report["label_errors"] = {
        "found": int(issues.sum()),
        "action": cfg.action,
        "features": cfg.features,
        "folds": cfg.folds,
        "examples": [
            {
                "text": _shown(texts[i]),
                "given": labels[given[i]],
                "suggested": labels[suggested[i]],
                "confidence": round(float(probs[i, suggested[i]]), 3),
            }
            for i in order[:EXAMPLES]
        ],
    }
    if cfg.action == "drop":
        _drop_train(frames, at)
    elif cfg.action == "relabel":
        column = train["label"].astype(str).to_numpy(copy=True)
        column[at] = [labels[j] for j in suggested[at]]
        frames["train"]["label"] = column
    step("label_errors", before, found=int(issues.sum()), action=cfg.action)
    return {
        "probs": probs.astype(np.float32),
        "labels": given,
        "issues": issues.astype(np.int8),
        "suggested": suggested,
    }


def check_curate_recipe(recipe) -> None:
    """`keel validate`'s checks of data.curate that the schema cannot make: the task, the libraries, the model."""
    import importlib.util

    from keel.errors import RecipeError

    cfg = recipe.data.curate
    if recipe.sft is not None or recipe.align is not None:
        raise RecipeError(
            "data.curate: sft and align recipes read their chats and pairs as they are; remove data.curate"
        )
    if cfg.label_errors is not None and recipe.task != "classification":
        raise RecipeError(
            f"data.curate.label_errors needs labels; remove it from this {recipe.task} recipe (or set it to null)"
        )
    needs = {"pii": ("presidio_analyzer", "presidio-analyzer"), "dedup": ("datasketch", "datasketch")}
    for step, (module, package) in needs.items():
        if getattr(cfg, step) is not None and importlib.util.find_spec(module) is None:
            raise RecipeError(f"data.curate.{step} needs {package}; install keel's requirements (make venv)")
    if cfg.label_errors is not None and cfg.label_errors.features != "tfidf":
        from keel.models.registry import resolve_model

        resolve_model(cfg.label_errors.features, field="data.curate.label_errors.features")
