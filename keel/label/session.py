"""A labelling session over a pool file: what to ask next, the answers stored append-only, the probe retrained.

The store is RUN/labels/<pool name>-<pool sha256[:12]>.jsonl, one JSON object per answer with the text and the
label (so the file itself is a training file: ``data.path`` can name it); a later answer for the same row wins,
nothing is rewritten. Each line is flushed and fsynced before the next text is shown; a line torn by a power cut
mid-write is ignored with a warning (the next answer starts on a line of its own). After each round the probe is
refitted on the run's training split plus every stored label, and its validation accuracy is appended to
``<store>.rounds.jsonl`` beside it, for the report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from keel.errors import DataError
from keel.label.probe import Probe, embed
from keel.label.strategies import STRATEGIES, select, uncertainty

logger = logging.getLogger(__name__)

LABELS_DIR = "labels"
PROBE_C = 3.0  # the probe's C: chosen on benchmarks/active_learning.py's validation split (over 1, 10, cross-validated)
PROBE_SEMI = "self-train"  # its semi-supervised fit (keel/label/semi.py), chosen there the same way (over none, spread)


def read_pool(path: str | Path, text_column: str) -> tuple[list[str], list]:
    """(texts, labels or None per row) of a pool file; one line naming the column when it has no text column."""
    from keel.data.load import _read_file

    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"--pool: file '{path}' not found; check the path")
    frame = _read_file(p, "auto")
    if text_column not in frame.columns:
        raise DataError(
            f"--pool: {p.name} has no column {text_column!r} (columns: {', '.join(map(str, frame.columns))}); "
            "rename its text column or pass --text-column <one of those>"
        )
    texts = ["" if v is None else str(v) for v in frame[text_column].tolist()]
    if not any(t.strip() for t in texts):
        raise DataError(f"--pool: {p.name} has no texts in column {text_column!r}; add rows to it")
    return texts, frame


class Session:
    """One person labelling one pool for one run. ``current()`` is the text to ask about (a pool row index) or
    None when the session is over; ``answer(row, label)`` stores it (None: skip) and moves on."""

    def __init__(
        self,
        run_dir: str | Path,
        pool: str | Path,
        strategy: str = "diverse",
        batch_size: int = 10,
        rounds: int = 5,
        seed: int = 0,
        text_column: str | None = None,
    ):
        if strategy not in STRATEGIES:
            raise DataError(f"--strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
        if batch_size < 1 or rounds < 1:
            raise DataError("--batch-size and --rounds must be at least 1")
        from keel.data.load import column_mapping
        from keel.data.splits import load_frozen
        from keel.runtime.load import load_trained

        self.run_dir = Path(run_dir)
        trained = load_trained(self.run_dir)  # checked against its manifest first
        if trained.info.get("task") != "classification":
            raise DataError(f"keel label needs a classification run; {self.run_dir} is {trained.info.get('task')}")
        self.labels = list(trained.info.get("labels") or [])
        self.column = text_column or column_mapping(trained.recipe.data, trained.recipe.task)["text"]
        self.texts, _ = read_pool(pool, self.column)
        self.strategy, self.batch_size, self.rounds = strategy, batch_size, rounds
        self.rng = np.random.default_rng(seed)
        pool = Path(pool)
        digest = hashlib.sha256(pool.read_bytes()).hexdigest()[:12]
        self.store = self.run_dir / LABELS_DIR / f"{pool.stem}-{digest}.jsonl"
        self.rounds_file = self.store.with_suffix(".rounds.jsonl")
        self.answers = self._read_store()  # row -> label
        splits = load_frozen(self.run_dir)
        max_len = trained.recipe.model.max_length
        logger.info(f"label: embedding {len(self.texts)} pool texts with the run's model (frozen)")
        self.x_pool = embed(trained.model, trained.tokenizer, self.texts, max_len)
        self.x_seed = embed(trained.model, trained.tokenizer, splits.train["text"].tolist(), max_len)
        self.y_seed = np.array([self.labels.index(v) for v in splits.train["label"]], dtype=np.int64)
        self.x_val = embed(trained.model, trained.tokenizer, splits.validation["text"].tolist(), max_len)
        self.y_val = np.array([self.labels.index(v) for v in splits.validation["label"]], dtype=np.int64)
        self.round, self.batch, self.skipped = 0, [], set()
        self.probe = Probe(len(self.labels), seed, c=PROBE_C, semi=PROBE_SEMI)
        self.started = time.time()
        self._retrain()

    # -- the state a page or a prompt shows ------------------------------------------------------------

    def current(self) -> int | None:
        """The pool row to ask about now; starts the next round when the batch is done; None when over."""
        while self.batch and (self.batch[0] in self.answers or self.batch[0] in self.skipped):
            self.batch.pop(0)
        if self.batch:
            return self.batch[0]
        if self.round >= self.rounds:
            return None
        self.batch = self._pick()
        return self.batch[0] if self.batch else None

    def answer(self, row: int, label: str | None) -> None:
        """Store the label of pool row ``row`` (None: skip it this session); retrain after the round's last."""
        if label is not None and label not in self.labels:
            raise DataError(f"label {label!r} is not one of the run's labels ({', '.join(self.labels)})")
        if not 0 <= row < len(self.texts):
            raise DataError(f"row {row} is not in the pool (0..{len(self.texts) - 1})")
        if label is None:
            self.skipped.add(row)
        else:
            self._append(
                {
                    "row": row,
                    "text": self.texts[row],
                    "label": label,
                    "round": self.round + 1,
                    "strategy": self.strategy,
                    "time": time.time(),
                }
            )
            self.answers[row] = label
        if row in self.batch:
            self.batch.remove(row)
        if not self.batch:
            self.round += 1
            self._retrain()

    @property
    def done(self) -> bool:
        return self.current() is None

    def score(self, row: int) -> float:
        """How uncertain the probe is about ``row`` (the strategy's own score; entropy for the others)."""
        margins = ("least-confidence", "margin", "balanced", "cluster-margin", "density")
        kind = self.strategy if self.strategy in margins else "entropy"
        return float(uncertainty(self.probs[row : row + 1], kind)[0])

    def prediction(self, row: int) -> str:
        return self.labels[int(self.probs[row].argmax())]

    # -- internals --------------------------------------------------------------------------------------

    def _pick(self) -> list[int]:
        open_rows = np.array(
            [
                i
                for i in range(len(self.texts))
                if i not in self.answers and i not in self.skipped and self.texts[i].strip()
            ]
        )
        if not len(open_rows):
            return []
        rows = sorted(self.answers)
        labelled = np.concatenate([self.x_seed, self.x_pool[rows]]) if rows else self.x_seed  # typiclust's
        local = select(
            self.probs[open_rows], self.batch_size, self.strategy, self.rng, self.x_pool[open_rows], labelled
        )
        return [int(open_rows[i]) for i in local]

    def _retrain(self) -> None:
        rows = sorted(self.answers)
        x = np.concatenate([self.x_seed, self.x_pool[rows]]) if rows else self.x_seed
        y = np.concatenate([self.y_seed, [self.labels.index(self.answers[r]) for r in rows]]).astype(np.int64)
        unlabelled = np.delete(self.x_pool, rows, axis=0)  # the pool's other texts (a semi-supervised fit's)
        self.probe.fit(x, y, unlabelled)
        self.probs = self.probe.predict_proba(self.x_pool)  # (N, K)
        acc = self.probe.accuracy(self.x_val, self.y_val)
        entry = {
            "session": self.started,
            "round": self.round,
            "labels": len(rows),
            "validation_accuracy": acc,
            "strategy": self.strategy,
        }
        self._append(entry, self.rounds_file)
        if acc is not None:
            logger.info(f"label: round {self.round}: {len(rows)} labels; probe validation accuracy {acc:.3f}")

    def _append(self, entry: dict, path: Path | None = None) -> None:
        path = path or self.store
        path.parent.mkdir(parents=True, exist_ok=True)
        torn = False
        if path.is_file() and path.stat().st_size:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        with open(path, "a", encoding="utf-8") as f:
            f.write(("\n" if torn else "") + json.dumps(entry, ensure_ascii=False) + "\n")  # a torn line stays alone
            f.flush()
            os.fsync(f.fileno())

    def _read_store(self) -> dict[int, str]:
        answers: dict[int, str] = {}
        if not self.store.is_file():
            return answers
        lines = self.store.read_text(encoding="utf-8").split("\n")
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                row, label = int(entry["row"]), str(entry["label"])
            except (ValueError, KeyError, TypeError):  # a line torn by an interrupted write
                logger.warning(f"label: {self.store.name} line {n} is not a complete label entry; ignoring it")
                continue
            if label in self.labels and 0 <= row < len(self.texts):
                answers[row] = label
        if answers:
            logger.info(f"label: {len(answers)} labels already stored in {self.store}")
        return answers
