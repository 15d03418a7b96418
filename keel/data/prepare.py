"""Tokenized splits, cached on disk by the content hash of data + tokenizer + settings.

A second run with the same data, tokenizer and data settings loads the Arrow files written by the
first one instead of reading and tokenizing again (and says so).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from keel.data.load import cap_splits, load_splits
from keel.io import atomic_dir, cache_dir, sha256_file
from keel.recipe import Recipe

logger = logging.getLogger(__name__)

PREP_VERSION = 1
SPLITS = ("train", "validation", "test")
_ANNOUNCED: set[str] = set()  # cache keys this process has already reported (training, test eval and report share one)


@dataclass
class Prepared:
    splits: dict  # name -> datasets.Dataset with input_ids (+ label, text, group)
    labels: list[str]
    meta: dict
    cache_hit: bool


def tokenizer_fingerprint(tokenizer) -> str:
    """What the tokenizer does, not where it lives: the same vocabulary and rules give the same key."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)  # runtime state that save/load changes; keel sets its own
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def prepare_data(recipe: Recipe, tokenizer, run_dir: str | Path | None = None, freeze: bool = False) -> Prepared:
    """Tokenized splits. With ``run_dir``, the splits frozen in that run directory (see keel/data/splits.py);
    ``freeze`` (training) splits the source and freezes it there first when the run has none yet."""
    import datasets

    datasets.disable_progress_bars()
    raw = None
    if run_dir is not None:
        from keel.data.splits import run_splits

        raw = run_splits(recipe, run_dir, freeze_missing=freeze)
    content = (raw.frozen_sha256 or raw.content_sha256) if raw is not None else _source_digest(recipe)[2]
    key_obj = {
        "v": PREP_VERSION,
        "content": content,
        # data.augment and data.weak act on the tokenized training split afterwards: not part of what is cached
        "data": recipe.data.model_dump(mode="json", exclude={"augment", "weak"}),
        "task": recipe.task,
        "max_length": recipe.model.max_length,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    key = hashlib.sha256(json.dumps(key_obj, sort_keys=True).encode()).hexdigest()
    folder = cache_dir() / "tokenized" / key
    if (folder / "meta.json").is_file() and (folder / "manifest.json").is_file():
        try:
            meta = json.loads((folder / "meta.json").read_text())
            splits = _load_splits(folder)
            if key not in _ANNOUNCED:
                if freeze:  # training: what was dropped from the source is said on a cached re-run too
                    for note in raw.notes if raw is not None else meta.get("notes") or []:
                        logger.info(f"data: {note}")
                logger.info(f"data: reusing tokenized cache {key[:12]} ({_counts(splits)})")
            _ANNOUNCED.add(key)
            return Prepared(splits, meta["labels"], meta, cache_hit=True)
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            logger.warning(f"data: tokenized cache {key[:12]} is unreadable; rebuilding it")

    t0 = time.perf_counter()
    if raw is None:
        raw = load_splits(recipe.data, recipe.task)
    for note in raw.notes:
        logger.info(f"data: {note}")
    tokenize = tokenize_classification if recipe.task == "classification" else _causal_lm
    splits = {s: tokenize(getattr(raw, s), tokenizer, recipe, raw.labels) for s in SPLITS}
    if recipe.task == "causal-lm":
        capped = cap_splits(*(list(range(len(splits[s]))) for s in SPLITS), recipe.data)
        splits = {s: splits[s].select(ids) for s, ids in zip(SPLITS, capped)}
    meta = {
        "key": key,
        "source": raw.source,
        "content_sha256": raw.content_sha256,
        "labels": raw.labels,
        "frozen_sha256": raw.frozen_sha256,
        "counts": {s: len(d) for s, d in splits.items()},
        "notes": raw.notes,
        "majority_label": _majority(raw.train, raw.labels) if recipe.task == "classification" else None,
    }
    with atomic_dir(folder) as tmp:
        for s, d in splits.items():
            if len(d):  # datasets cannot read back an empty split; _load_splits recreates it
                d.save_to_disk(str(tmp / s))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    splits = _load_splits(folder)
    logger.info(
        f"data: {raw.source}: tokenized in {time.perf_counter() - t0:.1f}s ({_counts(splits)}); cached as {key[:12]}"
    )
    _ANNOUNCED.add(key)
    return Prepared(splits, raw.labels, meta, cache_hit=False)


def _load_splits(folder: Path) -> dict:
    import datasets

    splits = {s: datasets.load_from_disk(str(folder / s)) for s in SPLITS if (folder / s).is_dir()}
    for s in SPLITS:
        if s not in splits:
            splits[s] = splits["train"].select([])  # same columns, no rows
    return {s: splits[s] for s in SPLITS}


def _source_digest(recipe: Recipe):
    from keel.data.builtin import DATASETS
    from keel.data.load import _hash_files, check_data_config

    check_data_config(recipe.data, recipe.task)
    if recipe.data.name is not None:
        paths = DATASETS[recipe.data.name].paths()
        return recipe.data.name, paths, _hash_files(paths)
    path = Path(recipe.data.path).expanduser()
    return str(path), [path], sha256_file(path)


def _counts(splits: dict) -> str:
    return ", ".join(f"{s} {len(d)}" for s, d in splits.items())


def _majority(train, labels: list[str]) -> str:
    return train["label"].value_counts().idxmax() if len(train) else labels[0]


def tokenize_classification(frame, tokenizer, recipe: Recipe, labels: list[str]):
    """A frame of text/label (and group) -> a Dataset with label ids and input_ids (unpadded)."""
    import datasets

    index = {name: i for i, name in enumerate(labels)}
    cols = {"text": frame["text"].tolist(), "label": [index[x] for x in frame["label"]]}
    if "group" in frame.columns:
        cols["group"] = frame["group"].astype(str).tolist()
    ds = datasets.Dataset.from_dict(cols)
    if not cols["text"]:  # an empty split (data.split.validation or test set to 0)
        return ds.add_column("input_ids", [])
    enc = tokenizer(cols["text"], truncation=True, max_length=recipe.model.max_length)
    ds = ds.add_column("input_ids", enc["input_ids"])
    if "token_type_ids" in enc:
        ds = ds.add_column("token_type_ids", enc["token_type_ids"])
    return ds


def _causal_lm(frame, tokenizer, recipe: Recipe, labels: list[str]):
    """Documents joined with EOS and cut into blocks of max_length tokens (the remainder is dropped)."""
    import datasets

    block = recipe.model.max_length
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for text in frame["text"]:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + eos)
    blocks = [stream[i : i + block] for i in range(0, len(stream) - block + 1, block)]
    return datasets.Dataset.from_dict({"input_ids": blocks})


def append_rows(train_ds, texts: list[str], labels: list[int], groups: list[str] | None, tokenizer, recipe: Recipe):
    """The tokenized training split with rows appended in memory (the tokenized cache on disk is never written
    to): ``texts`` tokenized as the split was, with their label ids and, where the split has one, their group."""
    import datasets

    new = {"text": list(texts), "label": list(labels)}
    if "group" in train_ds.column_names:
        new["group"] = list(groups) if groups is not None else [""] * len(new["text"])
    enc = tokenizer(new["text"], truncation=True, max_length=recipe.model.max_length)
    for col in ("input_ids", "token_type_ids"):
        if col in train_ds.column_names:
            new[col] = enc[col]
    extra = datasets.Dataset.from_dict(new).cast(train_ds.features)
    return datasets.concatenate_datasets([train_ds, extra])
