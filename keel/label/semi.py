"""Semi-supervised fits for the labelling probe: the unlabelled pool's embeddings help every strategy alike.

``spread`` is label propagation on a k-nearest-neighbour graph of the labelled and unlabelled texts (Zhou et al.
2004, as Iscen et al. 2019 use it to pseudo-label): each unlabelled text gets the labels diffused to it, its
confidence the certainty of that diffusion (1 - entropy / log K), and the logistic regression is refitted on the
labels plus those pseudo-labels weighted by confidence. ``self-train`` is one round of
self-training (Yarowsky 1995): the probe's own confident guesses on the pool, weighted by confidence, refitted on.
Either way a random sampler and an active one get the same model, so comparing them stays fair.
"""

from __future__ import annotations

import numpy as np

SEMI = ("none", "spread", "self-train")
NEIGHBOURS = 10  # spread: the graph's k (Iscen et al. use 50 on 50,000 images; a pool here has a few thousand)
ALPHA = 0.99  # spread: how far labels diffuse (Zhou et al.'s alpha)
ITERATIONS = 30  # spread: power iterations of F <- alpha S F + (1 - alpha) Y
SELF_TRAIN_SHARE = 0.5  # self-train: the most confident share of the unlabelled texts kept as pseudo-labels


def spread(x_lab: np.ndarray, y: np.ndarray, x_unl: np.ndarray, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """(pseudo-labels (U,), confidences (U,) in [0, 1]) of the unlabelled rows, by label propagation."""
    from scipy import sparse

    x = np.concatenate([x_lab, x_unl]).astype(np.float32)  # (L + U, H)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    n, k = len(x), min(NEIGHBOURS, len(x) - 1)
    sim = x @ x.T  # (N, N) cosine
    np.fill_diagonal(sim, -np.inf)
    nbr = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # (N, k)
    w = np.maximum(np.take_along_axis(sim, nbr, 1), 0.0) ** 3  # Iscen et al.'s s^3
    graph = sparse.csr_matrix((w.ravel(), (np.repeat(np.arange(n), k), nbr.ravel())), shape=(n, n))
    graph = graph + graph.T
    d = np.asarray(graph.sum(1)).ravel()
    inv = 1.0 / np.sqrt(np.maximum(d, 1e-12))
    s = sparse.diags(inv) @ graph @ sparse.diags(inv)
    seed = np.zeros((n, n_labels))
    seed[np.arange(len(y)), y] = 1.0
    f = seed.copy()
    for _ in range(ITERATIONS):
        f = ALPHA * (s @ f) + (1 - ALPHA) * seed
    f = f[len(y) :]
    p = np.maximum(f, 0) / np.maximum(np.maximum(f, 0).sum(1, keepdims=True), 1e-12)  # (U, K)
    reached = f.sum(1) > 1e-12
    ent = -(np.clip(p, 1e-12, 1) * np.log(np.clip(p, 1e-12, 1))).sum(1)
    conf = np.where(reached, 1.0 - ent / np.log(max(n_labels, 2)), 0.0)
    return p.argmax(1), conf


def pseudo_labelled(
    kind: str, model, x_lab: np.ndarray, y: np.ndarray, x_unl: np.ndarray, n_labels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, sample weights) to refit on: the labels and the unlabelled texts' pseudo-labels."""
    if kind == "spread":
        guess, conf = spread(x_lab, y, x_unl, n_labels)
    elif kind == "self-train":
        probs = model.predict_proba(x_unl)  # (U, K') over the seen labels
        guess, conf = model.classes_[probs.argmax(1)], probs.max(1)
        conf = np.where(conf >= np.quantile(conf, 1 - SELF_TRAIN_SHARE), conf, 0.0)
    else:
        raise ValueError(f"unknown semi-supervised fit {kind!r}; one of {', '.join(SEMI)}")
    keep = conf > 0
    weights = np.concatenate([np.ones(len(y)), conf[keep]])  # a pseudo-label weighs its confidence, a label 1
    return np.concatenate([x_lab, x_unl[keep]]), np.concatenate([y, guess[keep]]), weights
