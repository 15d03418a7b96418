"""Embeddings of a run's model (frozen) and the linear probe on them that stands in for retraining between rounds.

Fine-tuning the transformer after every batch of ten labels would take minutes on a CPU; a logistic regression on
the frozen, mean-pooled last hidden states takes well under a second, which keeps a person's labelling loop live.
"""

from __future__ import annotations

import numpy as np


def embed(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 32) -> np.ndarray:
    """(N, H) L2-normalised mean-pooled last hidden states, in the order given."""
    import torch

    out = []
    model.eval()
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        with torch.no_grad():
            hidden = model(**enc, output_hidden_states=True).hidden_states[-1]  # (B, T, H)
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, H)
        out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 1), dtype=np.float32)


C_GRID = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)  # c="cv": the inverse regularisation strengths tried


class Probe:
    """Logistic regression on embeddings; having seen one label it answers that one, having seen none, uniform.

    ``c`` is its inverse regularisation strength, or "cv": chosen from ``C_GRID`` by stratified cross-validation on
    the labelled texts alone (log-loss; 1.0 while some label has fewer than two examples). ``semi`` (keel/label/
    semi.py): "none", or "spread" / "self-train" to refit on the unlabelled texts' pseudo-labels as well."""

    def __init__(self, n_labels: int, seed: int = 0, c: float | str = 1.0, semi: str = "none"):
        self.n_labels, self.seed, self.c, self.semi = n_labels, seed, c, semi

    def fit(self, x: np.ndarray, y: np.ndarray, unlabelled: np.ndarray | None = None) -> Probe:
        """Fit on the labelled ``x`` (L, H), ``y`` (L,); with ``semi``, on ``unlabelled`` (U, H) too."""
        from sklearn.linear_model import LogisticRegression

        self.classes_ = np.unique(y)
        self.model_ = None
        if len(self.classes_) >= 2:
            self.c_ = _cross_validated_c(x, y, self.seed) if self.c == "cv" else float(self.c)
            self.model_ = LogisticRegression(max_iter=2000, C=self.c_, random_state=self.seed).fit(x, y)
            if self.semi != "none" and unlabelled is not None and len(unlabelled):
                from keel.label.semi import pseudo_labelled

                xs, ys, ws = pseudo_labelled(self.semi, self.model_, x, y, unlabelled, self.n_labels)
                self.model_ = LogisticRegression(max_iter=2000, C=self.c_, random_state=self.seed)
                self.model_.fit(xs, ys, sample_weight=ws)
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(N, K) over all of the run's labels (a label the probe has not seen gets probability 0)."""
        probs = np.full((len(x), self.n_labels), 1.0 / self.n_labels)
        if self.model_ is None and len(self.classes_) == 1:
            probs = np.zeros((len(x), self.n_labels))
            probs[:, self.classes_[0]] = 1.0
        elif self.model_ is not None:
            probs = np.zeros((len(x), self.n_labels))
            probs[:, self.model_.classes_] = self.model_.predict_proba(x)
        return probs

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float | None:
        return float((self.predict_proba(x).argmax(1) == y).mean()) if len(y) else None


def _cross_validated_c(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    folds = min(5, int(np.bincount(y)[np.unique(y)].min()))
    if folds < 2:
        return 1.0
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    scores = [
        cross_val_score(LogisticRegression(max_iter=2000, C=c), x, y, cv=cv, scoring="neg_log_loss").mean()
        for c in C_GRID
    ]
    return float(C_GRID[int(np.argmax(scores))])
