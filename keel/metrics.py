"""Metrics and the run's metric log (JSONL + TensorBoard)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from keel.io import atomic_write_text


def classification_metrics(y_true, y_pred, labels: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    ids = list(range(len(labels)))
    if len(y_true) == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "confusion": [], "labels": labels, "n": 0}
    per_class = f1_score(y_true, y_pred, labels=ids, average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        "f1_per_class": {labels[i]: float(v) for i, v in enumerate(per_class)},
        "confusion": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
        "labels": labels,
        "n": int(len(y_true)),
    }


def majority_baseline(y_true, majority: int, labels: list[str]) -> dict:
    y_true = np.asarray(y_true)
    m = classification_metrics(y_true, np.full_like(y_true, majority), labels)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "label": labels[majority]}


class MetricLog:
    """Append-only JSONL (one record per step or evaluation) mirrored to TensorBoard on the main process."""

    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        self._f = open(self.path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step)
        except ImportError:  # TensorBoard is optional; the JSONL is the record
            self._tb = None

    def _truncate_after(self, step: int) -> None:
        """On resume, keep what happened up to the checkpoint; drop torn lines and later steps."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self._tb is not None:
            split = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch") and math.isfinite(v):
                    self._tb.add_scalar(f"{split}/{k}", v, record.get("step", 0))

    def close(self) -> None:
        if self.enabled:
            self._f.close()
            if self._tb is not None:
                self._tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
