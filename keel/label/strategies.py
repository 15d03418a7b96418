"""Which unlabelled texts to ask about next: uncertainty sampling and a diversity-aware variant.

Scores follow Settles' survey (2009): least confidence (1 - max p), margin (smallest gap between the two most
likely labels), entropy. ``diverse`` is Zhdanov's diverse mini-batch active learning (2019): weighted k-means
over the most uncertain candidates (weights: entropy), then the candidate nearest each centre, so one batch does
not spend itself on near-duplicates of the same confusing text.
"""

from __future__ import annotations

import numpy as np

STRATEGIES = ("least-confidence", "margin", "entropy", "diverse", "random")
DIVERSE_POOL = 10  # diverse: candidates per batch slot (Zhdanov's beta)


def uncertainty(probs: np.ndarray, strategy: str) -> np.ndarray:
    """(N,) scores, higher = more uncertain, from probabilities (N, K)."""
    if strategy == "least-confidence":
        return 1.0 - probs.max(axis=1)
    if strategy == "margin":
        top2 = np.sort(probs, axis=1)[:, -2:]  # (N, 2)
        return -(top2[:, 1] - top2[:, 0]) if probs.shape[1] > 1 else np.zeros(len(probs))
    if strategy in ("entropy", "diverse"):
        p = np.clip(probs, 1e-12, 1.0)
        return -(p * np.log(p)).sum(axis=1)
    raise ValueError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")


def select(
    probs: np.ndarray, k: int, strategy: str, rng: np.random.Generator, embeddings: np.ndarray | None = None
) -> list[int]:
    """Indices (into ``probs``) of the ``k`` texts to label next, the most useful first."""
    n = len(probs)
    k = min(k, n)
    if k <= 0:
        return []
    if strategy == "random":
        return [int(i) for i in rng.choice(n, size=k, replace=False)]
    scores = uncertainty(probs, strategy)
    # ties (e.g. a probe that has seen one label only) are broken at random, not by file order
    order = np.lexsort((rng.random(n), -scores))
    if strategy != "diverse" or embeddings is None or k == 1:
        return [int(i) for i in order[:k]]
    from sklearn.cluster import KMeans

    cand = order[: min(n, DIVERSE_POOL * k)]
    km = KMeans(n_clusters=k, n_init=1, random_state=int(rng.integers(2**31)))
    km.fit(embeddings[cand], sample_weight=scores[cand] + 1e-9)
    picked: list[int] = []
    for c in range(k):
        members = cand[km.labels_ == c]
        if not len(members):
            continue
        d = np.linalg.norm(embeddings[members] - km.cluster_centers_[c], axis=1)
        picked.append(int(members[d.argmin()]))
    rest = [int(i) for i in cand if int(i) not in set(picked)]
    picked.sort(key=lambda i: -scores[i])
    return (picked + rest)[:k]
