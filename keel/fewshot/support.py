"""The support file of `keel fewshot`: a few labelled texts per label, read and checked row by row."""

from __future__ import annotations

import logging
from pathlib import Path

from keel.errors import DataError

logger = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


def read_support(path: str | Path, text_column: str, label_column: str, k_shot: int | None = None, seed: int = 0):
    """(texts, labels) of a support file, at most ``k_shot`` rows per label (a seeded sample). Labels are names
    (text) or whole numbers; each text appears once."""
    import pandas as pd

    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"--support: file '{path}' not found; check the path")
    kind = FORMATS.get(p.suffix.lower())
    if kind is None:
        raise DataError(
            f"--support: cannot tell the format of '{p.name}'; use a .csv, .tsv, .jsonl, .json or .parquet file"
        )
    try:
        if kind in ("csv", "tsv"):
            frame = pd.read_csv(p, sep="\t" if kind == "tsv" else ",", dtype=object, keep_default_na=False)
        elif kind == "parquet":
            frame = pd.read_parquet(p)
        else:
            frame = pd.read_json(p, lines=kind == "jsonl", dtype=False)
    except Exception as e:  # pandas and pyarrow raise many types for a malformed file
        why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DataError(f"--support: cannot read {p.name} as {kind}: {why}; fix the file or convert it") from None
    for role, column in (("text", text_column), ("label", label_column)):
        if column not in frame.columns:
            have = ", ".join(map(str, frame.columns)) or "none"
            raise DataError(
                f"--support: {p.name} has no {role} column {column!r} (columns: {have}); "
                f"set fewshot.{role}_column=<one of those>"
            )
    texts, labels, seen = [], [], {}
    for row, (text, label) in enumerate(zip(frame[text_column], frame[label_column]), start=1):
        where = f"--support: {p.name} row {row}"
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: the {text_column!r} value is empty or not text; give every row a text")
        name = _label_name(label)
        if name is None:
            raise DataError(
                f"{where}: label {label!r} is not a label name; use a word or a whole number "
                f"(e.g. 'refund' or 3) in the {label_column!r} column"
            )
        if text in seen:
            if seen[text] != name:
                raise DataError(f"{where}: the same text is labelled {seen[text]!r} on an earlier row; keep one")
            continue  # an exact repeat adds nothing
        seen[text] = name
        texts.append(text)
        labels.append(name)
    if not texts:
        raise DataError(f"--support: {p.name} has no rows; give a few labelled examples per label")
    if k_shot is not None:
        texts, labels = _at_most(texts, labels, k_shot, seed)
    return texts, labels


def _label_name(value) -> str | None:
    """A label as the run stores it (text; whole numbers written without a decimal point), or None if it is not one."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else None
    if hasattr(value, "item") and not isinstance(value, str):  # numpy scalars from parquet
        return _label_name(value.item())
    if isinstance(value, str) and value.strip() and value == value.strip() and "\n" not in value:
        return value
    return None


def _at_most(texts: list[str], labels: list[str], k: int, seed: int) -> tuple[list[str], list[str]]:
    import random

    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, name in enumerate(labels):
        by_label.setdefault(name, []).append(i)
    keep = sorted(i for rows in by_label.values() for i in (rows if len(rows) <= k else rng.sample(rows, k)))
    return [texts[i] for i in keep], [labels[i] for i in keep]
