"""Reading examples: a built-in data set or a user's file, mapped to keel's columns and split.

Every source ends as a pandas frame with the columns ``text``, ``label`` (classification) and
optionally ``group``; the split is a pure function of the data and ``data.split.seed``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from keel.data.builtin import DATASETS
from keel.errors import DataError, RecipeError
from keel.io import cache_dir, sha256_file
from keel.recipe import DataConfig

if TYPE_CHECKING:
    import pandas as pd

FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


@dataclass
class RawSplits:
    """Text-level splits plus what a reader of the run needs to know about them."""

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    labels: list[str]
    source: str
    content_sha256: str
    notes: list[str] = field(default_factory=list)
    frozen_sha256: str | None = None  # set when read from a run directory's frozen splits (keel/data/splits.py)


def column_mapping(cfg: DataConfig, task: str) -> dict:
    """keel role -> source column: the recipe's data.columns, else the data set's defaults."""
    if cfg.columns is not None:
        columns = cfg.columns.model_dump(exclude_none=True)
    elif cfg.name is not None and cfg.name in DATASETS:
        columns = dict(DATASETS[cfg.name].columns)
    else:
        columns = {"text": "text", "label": "label"}
    if task == "causal-lm":
        columns.pop("label", None)
    return columns


def check_data_config(cfg: DataConfig, task: str, content: bool = False) -> dict:
    """Cheap checks for `keel validate`: the source exists and the columns are there; with ``content``, also what
    the rows hold (check_content). Returns the mapping."""
    if cfg.name is not None and cfg.name not in DATASETS:
        raise RecipeError(
            f"data.name: unknown data set '{cfg.name}'; built-in ones: {', '.join(DATASETS)} (or set data.path)"
        )
    columns = column_mapping(cfg, task)
    if cfg.path is not None:
        path = Path(cfg.path).expanduser()
        if not path.is_file():
            raise DataError(
                f"data.path: file '{cfg.path}' not found; check the path (a relative data.path is relative "
                "to the recipe file's folder)"
            )
        header = _peek_columns(path, cfg.format)
        if header is not None:
            _check_columns(columns, header, cfg.path)
        if content:
            check_content(path, cfg, task, columns)
    return columns


# What `keel validate` reads of a data file: all of it up to this size, else the whole lines of this prefix.
PEEK_BYTES = 4 * 1024 * 1024


def check_content(path: Path, cfg: DataConfig, task: str, columns: dict) -> None:
    """Without pandas or datasets: the rows of a CSV/JSONL file (or the prefix of a huge one) decode, parse and hold
    usable examples, and a classifier's data has two labels at least. Errors name the line."""
    kind = _format_of(path, cfg.format)
    if kind == "parquet":
        return _check_parquet(path, cfg, task, columns)
    with open(path, "rb") as f:
        data = f.read(PEEK_BYTES + 1)
    whole = len(data) <= PEEK_BYTES
    if not whole:
        data = data[: data.rfind(b"\n", 0, PEEK_BYTES) + 1]
    if not data.strip():
        what = "a header line and one example per line" if kind == "csv" else "one JSON object per example, a line each"
        raise DataError(f"data: {path} is empty; add {what}")
    errors = cfg.encoding_errors if kind == "csv" else "strict"
    try:
        text = data.decode("utf-8", errors=errors).removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        fix = " or set data.encoding_errors=replace" if kind == "csv" else ""
        raise _not_utf8(path, data, e, fix) from None
    label = columns.get("label") if task == "classification" else None
    keys = (columns["text"], label)
    rows = (
        _csv_rows(text, path, keys)
        if kind == "csv"
        else ((n, row.get(keys[0]), row.get(label) if label else None) for n, row in _jsonl_rows(text, path))
    )
    declared = None if cfg.labels is None else [str(x) for x in cfg.labels]
    usable, labels = 0, set()
    for n, value, y in rows:
        if value is None or not str(value).strip():
            continue
        if label is not None:
            if y is None or str(y).strip() == "":
                continue
            y = _label_str(y)
            if declared is not None and y not in declared:
                raise DataError(
                    f"{path} line {n}: label {y!r} is not in data.labels ({', '.join(declared)}); add it to "
                    "data.labels or drop those rows"
                )
            labels.add(y)
        usable += 1
    if not whole:
        return  # a prefix: too little seen to judge the whole file's rows or labels
    if usable == 0:
        need = f"'{columns['text']}'" + (f" and '{label}'" if label else "")
        raise DataError(f"data: {path} has no usable rows (none with a non-empty {need}); add examples to it")
    if label is not None and declared is None and len(labels) < 2:
        raise DataError(f"data: {path} has a single label ({next(iter(labels))!r}); a classifier needs at least two")


def _csv_rows(text: str, path: Path, keys: tuple):
    """(line number, text, label) per data row of a CSV/TSV text (``keys``: their columns; the label's may be None);
    blank lines are skipped, as pandas does."""
    import csv
    import io

    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    try:
        header = next(reader, None)
        if header is None:
            return
        at = [header.index(k) if k in header else None for k in keys]  # check_data_config named missing ones
        width = len(header)
        for row in reader:
            if not row or not any(row):
                continue
            if len(row) > width:
                raise DataError(
                    f"{path} line {reader.line_num}: {len(row)} fields, the header has {width}; "
                    "quote a text that holds the delimiter"
                )
            yield (reader.line_num, *(row[i] if i is not None and i < len(row) else None for i in at))
    except csv.Error as e:
        raise DataError(f"{path} line {reader.line_num}: {e}; check the quoting there") from None


def _jsonl_rows(text: str, path: Path):
    """(line number, object) per line of a JSONL text; a .json file that is one JSON array is read as a whole."""
    import json

    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, list):
            yield from ((1, r) for r in doc if isinstance(r, dict))
            return
    yield from jsonl_objects(text.splitlines(), path)


def jsonl_objects(lines, path) -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-blank line; a line that is not a JSON object fails naming its number."""
    import json

    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DataError(
                f"{path} line {n}: not JSON ({getattr(e, 'msg', e)}); write one JSON object per line"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(
                f"{path} line {n}: a JSON {type(obj).__name__}, not an object; write one JSON object per line"
            )
        yield n, obj


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """A whole JSONL file as (line number, object) pairs; bytes that are not UTF-8 fail naming their line."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, data, e) from None
    return list(jsonl_objects(text.splitlines(), path))


def _not_utf8(path, data: bytes, e: UnicodeDecodeError, fix: str = "") -> DataError:
    line = data.count(b"\n", 0, e.start) + 1
    return DataError(f"{path} line {line}: not valid UTF-8 (byte {data[e.start]:#x}); re-save the file as UTF-8{fix}")


def _check_parquet(path: Path, cfg: DataConfig, task: str, columns: dict) -> None:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except (OSError, ValueError) as e:
        raise _unreadable(path, "parquet", str(e)) from None
    if meta.num_rows == 0:
        raise DataError(f"data: {path} has no rows; add examples to it")
    label = columns.get("label") if task == "classification" else None
    if label is not None and cfg.labels is None and meta.num_rows <= 1_000_000:  # one column: cheap
        values = {_label_str(v) for v in pq.read_table(path, columns=[label]).column(0).to_pylist() if v is not None}
        if len(values) < 2:
            shown = f" ({next(iter(values))!r})" if values else ""
            raise DataError(f"data: {path} has a single label{shown}; a classifier needs at least two")


def read_frame(cfg: DataConfig, task: str) -> tuple[pd.DataFrame, str, str]:
    """The source as a frame with keel's column names; also a display name and a content hash."""
    columns = check_data_config(cfg, task)
    if cfg.name is not None:
        spec = DATASETS[cfg.name]
        paths = spec.paths()
        if not paths:
            raise DataError(f"data set '{cfg.name}' has no files in package '{spec.package}'; reinstall it (make venv)")
        frame = spec.read(paths)
        digest = _hash_files(paths)
        source = f"{cfg.name} (package {spec.package})"
    else:
        path = Path(cfg.path).expanduser()
        frame = _read_file(path, cfg.format, cfg.encoding_errors)
        digest = sha256_file(path)
        source = str(path)
    _check_columns(columns, list(frame.columns), source)
    frame = _copy_columns(frame, columns)
    return frame, source, digest


def source_digest(cfg: DataConfig) -> tuple[str, str]:
    """The content hash of the source files and their display name, without reading them as data."""
    if cfg.name is not None:
        if cfg.name not in DATASETS:
            raise RecipeError(f"data.name: unknown data set '{cfg.name}'")
        return _hash_files(DATASETS[cfg.name].paths()), cfg.name
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise DataError(f"data.path: file '{cfg.path}' not found; check the path")
    return sha256_file(path), str(path)


def load_splits(cfg: DataConfig, task: str) -> RawSplits:
    import pandas as pd  # noqa: F401  (frames below)

    frame, source, digest = read_frame(cfg, task)
    notes: list[str] = []
    n0 = len(frame)
    frame = frame.dropna(subset=[c for c in ("text", "label") if c in frame.columns])
    frame["text"] = frame["text"].astype(str)
    frame = frame[frame["text"].str.strip() != ""]
    if len(frame) < n0:
        notes.append(f"dropped {n0 - len(frame)} rows with an empty text or label")
    if cfg.dedup:
        n1 = len(frame)
        frame = frame.drop_duplicates(subset="text", keep="first")
        if len(frame) < n1:
            notes.append(f"dropped {n1 - len(frame)} repeated texts (data.dedup)")
    if len(frame) == 0:
        raise DataError(f"data: {source} has no usable rows; it needs non-empty '{'text'}' values")
    frame = frame.reset_index(drop=True)

    labels: list[str] = []
    if task == "classification":
        frame["label"] = frame["label"].map(_label_str)
        labels = _label_set(frame["label"], cfg.labels, source)
    train, validation, test = _split(frame, cfg, task, notes)
    if task == "classification":  # causal-lm caps count token blocks, applied after tokenizing
        train, validation, test = cap_splits(train, validation, test, cfg)
    if len(train) == 0:
        raise DataError(f"data: the training split of {source} is empty; use more data or smaller data.split fractions")
    return RawSplits(
        train.reset_index(drop=True),
        validation.reset_index(drop=True),
        test.reset_index(drop=True),
        labels,
        source,
        digest,
        notes,
    )


def cap_splits(train, validation, test, cfg: DataConfig):
    """data.max_train_samples / max_eval_samples: the first rows of each (already shuffled) split."""
    if cfg.max_train_samples:
        train = train[: cfg.max_train_samples]
    if cfg.max_eval_samples:
        validation, test = validation[: cfg.max_eval_samples], test[: cfg.max_eval_samples]
    return train, validation, test


def read_eval_file(path: str, columns: dict, labels: list[str] | None, fmt: str = "auto") -> pd.DataFrame:
    """A user's labelled file for `keel eval --data`, checked against the model's label set (None: any labels)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"--data: file '{path}' not found; check the path")
    frame = _read_file(p, fmt)
    need = {k: v for k, v in columns.items() if k in ("text", "label")}
    _check_columns(need, list(frame.columns), path, where="--data", fix="pass --{role}-column <one of those>")
    frame = frame[[need["text"], need["label"]]].set_axis(["text", "label"], axis=1).dropna()
    if len(frame) == 0:
        raise DataError(f"--data: {path} has no rows with both a text and a label")
    frame["text"] = frame["text"].astype(str)
    frame["label"] = frame["label"].map(_label_str)
    unseen = sorted(set(frame["label"]) - set(labels if labels is not None else frame["label"]))
    if unseen:
        raise DataError(
            f"--data: label {unseen[0]!r} in {path} is not one the model knows ({', '.join(labels)}); "
            "map those rows to a known label or drop them"
        )
    return frame.reset_index(drop=True)


# -- helpers -------------------------------------------------------------------------------------


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"data.path: cannot tell the format of '{path.name}'; use .csv, .jsonl or .parquet, or set data.format"
        )
    return kind


def _read_file(path: Path, fmt: str, encoding_errors: str = "strict") -> pd.DataFrame:
    """Read a user's file through `datasets` (the same loader people use for the Hub, on a local file)."""
    import glob

    import datasets

    kind = _format_of(path, fmt)
    builder = {"csv": "csv", "jsonl": "json", "parquet": "parquet"}[kind]
    kwargs = {"sep": "\t"} if path.suffix.lower() == ".tsv" else {}
    if kind == "csv":
        kwargs["encoding_errors"] = encoding_errors
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)  # its "Failed to read" line would repeat ours
    try:
        # data_files is a glob pattern: a name with [ ] * ? must match only itself
        ds = datasets.load_dataset(
            builder,
            data_files=glob.escape(str(path.resolve())),
            split="train",
            cache_dir=str(cache_dir() / "hf-datasets"),
            **kwargs,
        )
    except Exception as e:  # pyarrow / pandas parse errors come in many types
        cause = e.__cause__ or e
        if isinstance(cause, UnicodeDecodeError):
            raise DataError(
                f"data: {path} is not valid UTF-8 (byte {cause.object[cause.start]:#x} at position {cause.start} "
                "of a line); re-save it as UTF-8 or set data.encoding_errors=replace"
            ) from None
        msg = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        if "corresponds to no data" in msg or "No columns to parse" in msg:
            raise DataError(f"data: {path} has no usable rows; add examples to it") from None
        raise _unreadable(path, kind, msg) from None
    return ds.to_pandas()


def _unreadable(path: Path, kind: str, why: str) -> DataError:
    return DataError(f"data: could not read {path} as {kind}: {why[:200]}; check the file's format")


def _peek_columns(path: Path, fmt: str) -> list[str] | None:
    """Column names without reading the whole file (CSV, JSONL, the Parquet schema); None when that is not cheap."""
    import csv
    import json

    kind = _format_of(path, fmt)
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except (OSError, ValueError) as e:
            raise _unreadable(path, kind, str(e)) from None
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            if kind == "csv":
                row = next(csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","), None)
                return row
            if kind == "jsonl":
                line = f.readline().strip()
                obj = json.loads(line) if line else None
                return list(obj) if isinstance(obj, dict) else None
    except (ValueError, csv.Error):
        return None
    return None


def _check_columns(
    columns: dict,
    available: list[str],
    source: str,
    where: str = "data.columns.{role}",
    fix: str = "set data.columns.{role}=<one of those>",
) -> None:
    for role, name in columns.items():
        if name not in available:
            shown = ", ".join(map(str, available[:12])) + (" ..." if len(available) > 12 else "")
            raise DataError(
                f"{where.format(role=role)}: column '{name}' is not in {source} (columns: {shown}); "
                f"{fix.format(role=role)}"
            )


def _copy_columns(frame: pd.DataFrame, columns: dict) -> pd.DataFrame:
    """A frame of keel's roles; two roles may share a source column (crows-pairs: label and group)."""
    import pandas as pd

    return pd.DataFrame({role: frame[src].values for role, src in columns.items()})


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def _label_str(v) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v)


def _natural(labels) -> list[str]:
    try:
        return sorted(labels, key=float)
    except ValueError:
        return sorted(labels)


def _label_set(series: pd.Series, declared: list[str] | None, source: str) -> list[str]:
    present = set(series)
    if declared is not None:
        declared = [str(x) for x in declared]
        unseen = sorted(present - set(declared))
        if unseen:
            raise DataError(
                f"data: label {unseen[0]!r} in {source} is not in data.labels ({', '.join(declared)}); "
                "add it to data.labels or drop those rows"
            )
        return declared
    labels = _natural(present)
    if len(labels) < 2:
        raise DataError(f"data: {source} has a single label ({labels[0]!r}); a classifier needs at least two")
    return labels


def _split(frame: pd.DataFrame, cfg: DataConfig, task: str, notes: list[str]):
    from sklearn.model_selection import train_test_split

    s = cfg.split
    idx = list(range(len(frame)))
    strat = frame["label"] if (task == "classification" and s.stratify) else None
    if strat is not None and strat.value_counts().min() < 3:
        notes.append("some label has fewer than 3 examples: split without stratification")
        strat = None

    def cut(ids, frac, stratify):
        n_out = round(len(ids) * frac)
        if frac == 0 or n_out == 0:
            return ids, []
        if n_out >= len(ids):
            raise DataError(f"data: too few rows ({len(frame)}) for data.split; add data or lower the split fractions")
        try:
            a, b = train_test_split(
                ids,
                test_size=n_out,
                random_state=s.seed,
                shuffle=True,
                stratify=None if stratify is None else stratify.iloc[ids],
            )
        except ValueError:  # too few per class for a stratified cut of this size
            a, b = train_test_split(ids, test_size=n_out, random_state=s.seed, shuffle=True)
        return list(a), list(b)

    rest, test_ids = cut(idx, s.test, strat)
    train_ids, val_ids = cut(rest, s.validation / (1 - s.test) if s.test < 1 else 0, strat)
    return frame.iloc[train_ids], frame.iloc[val_ids], frame.iloc[test_ids]
