"""Label errors by confident learning (Northcutt, Jiang and Chuang, "Confident Learning: Estimating Uncertainty in
Dataset Labels", JAIR 70, 2021), written here from the paper: cleanlab, its reference implementation, is AGPL-3.0
and keel is Apache-2.0 (benchmarks/label_errors_vs_cleanlab.py compares the two on the same probabilities).

1. Out-of-fold predicted probabilities ``P`` (n, K): a linear probe (logistic regression) trained k times on
   frozen features (MiniLM sentence embeddings or TF-IDF), each time predicting the fold it did not see.
2. Per-class thresholds ``t_j``: the mean of ``P[:, j]`` over the examples labelled ``j`` (self-confidence).
3. The confident joint ``C`` (K, K): example x with given label i counts in ``C[i, j]`` for the class j with the
   highest ``P[x, j]`` among those with ``P[x, j] >= t_j``; examples above no threshold are not counted.
   ``C`` is calibrated so that each row sums to the number of examples given that label (paper eq. 3).
4. Prune by noise rate (paper section 3.2, "C_confusion" / "PBNR"): for each off-diagonal cell (i, j), the
   ``C[i, j]`` examples labelled i with the largest margin ``P[x, j] - P[x, i]`` are label errors, and j is the
   suggested label; at least one example of each class is kept, and an example whose predicted class is its given
   label is never flagged.
"""

from __future__ import annotations

import numpy as np


def confident_joint(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """The calibrated confident joint (K, K), rows = given label, columns = estimated true label; integer counts.

    labels: (n,) ints in [0, K); probs: (n, K) rows summing to 1."""
    n, k = probs.shape
    thresholds = np.array([probs[labels == j, j].mean() if np.any(labels == j) else 1.0 for j in range(k)])  # (K,)
    above = probs >= thresholds - 1e-6  # (n, K): the classes x is confidently in
    counted = above.any(axis=1)  # (n,)
    true_guess = np.where(above, probs, -np.inf).argmax(axis=1)  # (n,)
    joint = np.zeros((k, k), dtype=np.int64)
    np.add.at(joint, (labels[counted], true_guess[counted]), 1)
    # calibrate: each row sums to the count of its given label (row proportions kept), rounded keeping row totals
    label_counts = np.bincount(labels, minlength=k)  # (K,)
    rows = joint.sum(axis=1, keepdims=True)  # (K, 1)
    fallback = np.diag(label_counts).astype(float)  # a class nobody is confident about: all on its diagonal
    scaled = np.where(rows > 0, joint / np.maximum(rows, 1) * label_counts[:, None], fallback)
    return _round_keeping_row_totals(scaled, label_counts)


def _round_keeping_row_totals(matrix: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Round each row to integers that still sum to its total (largest remainders get the leftover units)."""
    floor = np.floor(matrix).astype(np.int64)
    for r in range(matrix.shape[0]):
        short = int(totals[r] - floor[r].sum())
        if short > 0:
            order = np.argsort(-(matrix[r] - floor[r]), kind="stable")
            floor[r, order[:short]] += 1
    return floor


def find_label_issues(
    labels: np.ndarray, probs: np.ndarray, min_per_class: int = 1, exclusive: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(mask of label errors (n,), suggested label per example (n,): the given one where no error was found).

    ``exclusive``: each cell (i, j) picks among the rows no other cell of class i took, so as many rows are flagged
    as the joint estimates errors (the paper's "remove n * Q[i][j] examples"); False lets two cells pick the same
    row (cleanlab 2.9 does this, and flags fewer rows)."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n, k = probs.shape
    joint = confident_joint(labels, probs)
    issues = np.zeros(n, dtype=bool)
    suggested = labels.copy()
    for i in range(k):
        members = np.flatnonzero(labels == i)
        budget = max(len(members) - min_per_class, 0)  # keep at least min_per_class examples of class i
        prune = joint[i].copy()
        prune[i] = 0
        if prune.sum() > budget:  # shrink every cell in proportion, keeping the largest ones first
            prune = _round_keeping_row_totals(prune[None, :] * budget / prune.sum(), np.array([budget]))[0]
        for j in np.flatnonzero(prune):
            candidates = members[~issues[members]] if exclusive else members
            margin = probs[candidates, j] - probs[candidates, i]  # (m,)
            picked = candidates[np.argsort(-margin, kind="stable")[: prune[j]]]
            suggested[picked[~issues[picked]]] = j  # the first cell that picked a row names its label
            issues[picked] = True
    agrees = probs.argmax(axis=1) == labels
    issues &= ~agrees
    suggested[~issues] = labels[~issues]
    return issues, suggested


def out_of_fold_probs(features, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(n, K) probabilities, each row from a logistic regression that did not see that row."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    k = int(labels.max()) + 1
    smallest = np.bincount(labels, minlength=k).min()
    folds = max(2, min(folds, int(smallest))) if smallest >= 2 else 2
    probs = np.zeros((len(labels), k))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fit_idx, held_idx in splitter.split(np.zeros(len(labels)), labels):
        probe = LogisticRegression(max_iter=1000, C=1.0)
        probe.fit(features[fit_idx], labels[fit_idx])
        probs[np.ix_(held_idx, probe.classes_)] = probe.predict_proba(features[held_idx])
    return probs


def features(texts: list[str], kind: str):
    """What the probe sees: TF-IDF word uni/bigrams, or mean-pooled MiniLM sentence embeddings (frozen)."""
    if kind == "tfidf":
        from sklearn.feature_extraction.text import TfidfVectorizer

        return TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True).fit_transform(texts)
    return _embed(texts, kind)


def _embed(texts: list[str], model_name: str, batch_size: int = 64) -> np.ndarray:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from keel.models.registry import model_dir

    folder = model_dir(model_name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt"
            )
            hidden = model(**batch).last_hidden_state  # (B, T, H)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, H)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out)
