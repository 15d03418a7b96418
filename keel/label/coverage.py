"""Strategies that weigh where a text lies as well as how unsure the probe is (keel/label/strategies.py calls them).

``probcover`` is Yehuda et al.'s ProbCover (2022) for the low budget: balls of radius delta around every text, delta
the largest at which 95% of balls are pure under a k-means clustering into as many clusters as labels; then,
greedily, the text whose ball covers the most texts no label covers yet (random once every text is covered).
``cluster-margin`` is Citovsky et al.'s Cluster-Margin (2021): the texts with the smallest margins (ten per pick),
clustered by average-linkage agglomerative clustering, taken round robin from the smallest cluster up, at random
within one. ``density`` is Settles and Craven's information density (2008): margin uncertainty times typicality
(the inverse mean distance to the nearest neighbours), so an unsure outlier waits behind an unsure typical text.
"""

from __future__ import annotations

import numpy as np

PURITY = 0.95  # probcover: the share of pure balls delta must keep (Yehuda et al.'s alpha)
MARGIN_POOL = 10  # cluster-margin: candidates per pick (Citovsky et al.'s k_m / k_t)


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sa, sb = (a**2).sum(1), (b**2).sum(1)
    return np.sqrt(np.maximum(sa[:, None] + sb[None, :] - 2 * a @ b.T, 0.0))


def cover_radius(x: np.ndarray, n_clusters: int, seed: int) -> float:
    """The largest delta (over quantiles of the pairwise distances) whose balls are pure for PURITY of the texts."""
    from sklearn.cluster import KMeans

    if len(x) <= n_clusters:
        return 0.0
    cluster = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed).fit(x).labels_
    d = _distances(x, x)  # (N, N)
    np.fill_diagonal(d, np.inf)
    # a ball is impure once its radius reaches the nearest text of another cluster
    impure_at = np.where(cluster[None, :] != cluster[:, None], d, np.inf).min(1)  # (N,)
    return float(np.quantile(impure_at, 1 - PURITY))


def probcover(
    embeddings: np.ndarray, k: int, rng: np.random.Generator, labelled: np.ndarray | None, n_labels: int
) -> list[int]:
    """ProbCover's greedy max coverage over the candidates (the ``labelled`` texts' balls count as covered)."""
    n_lab = 0 if labelled is None else len(labelled)
    x = embeddings if not n_lab else np.concatenate([labelled, embeddings])  # (L + N, H)
    delta = cover_radius(x, max(2, n_labels), int(rng.integers(2**31)))
    ball = _distances(embeddings, x) <= delta  # (N, L + N): candidate i covers text j
    covered = np.zeros(len(x), dtype=bool)  # (L + N,) texts inside some labelled text's ball
    if n_lab:
        covered |= (_distances(labelled, x) <= delta).any(0)
    picked: list[int] = []
    open_ = np.ones(len(embeddings), dtype=bool)
    while len(picked) < k:
        gain = (ball & ~covered).sum(1) * open_  # (N,)
        if gain.max() <= 0:
            rest = np.flatnonzero(open_)
            picked += [int(i) for i in rng.choice(rest, size=min(k - len(picked), len(rest)), replace=False)]
            break
        best = int(np.lexsort((rng.random(len(gain)), -gain))[0])
        picked.append(best)
        open_[best] = False
        covered |= ball[best]
    return picked


def cluster_margin(scores: np.ndarray, embeddings: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """Cluster-Margin over the MARGIN_POOL * k most uncertain candidates (``scores``: higher = more uncertain)."""
    from sklearn.cluster import AgglomerativeClustering

    n = len(scores)
    cand = np.lexsort((rng.random(n), -scores))[: min(n, MARGIN_POOL * k)]
    if len(cand) <= k:
        return [int(i) for i in cand]
    cluster = AgglomerativeClustering(n_clusters=k, linkage="average").fit(embeddings[cand]).labels_
    groups = [list(rng.permutation(cand[cluster == c])) for c in range(k)]
    groups.sort(key=len)  # the smallest clusters first (Citovsky et al.)
    picked: list[int] = []
    while len(picked) < k:
        for g in groups:
            if g and len(picked) < k:
                picked.append(int(g.pop()))
    return picked


def density(scores: np.ndarray, typical: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """Information density: uncertainty (``scores`` of margin: -gap, so 1 + score in [0, 1]) times ``typical``."""
    weight = (1.0 + scores) * typical
    return [int(i) for i in np.lexsort((rng.random(len(scores)), -weight))[:k]]
