"""Training the encoder for few-shot use: SetFit's contrastive pairs, and prototypical-network episodes.

Both train the features a classifier's head reads (keel/fewshot/heads.py), so whatever head is fitted afterwards
sees exactly what the saved model computes. Plain torch on purpose: the `setfit` package would bring a second
model format (a pickled scikit-learn head) that keel does not load.
"""

from __future__ import annotations

import logging
import random

import torch
import torch.nn.functional as F

from keel.fewshot.episodes import EpisodeSampler
from keel.fewshot.heads import forward_features, prototypes, squared_distances

logger = logging.getLogger(__name__)


def contrastive_pairs(y: list[int], iterations: int, seed: int = 0) -> list[tuple[int, int, float]]:
    """SetFit's pair generation: per iteration and per row, one pair with a row of its class (target 1) and one
    with a row of another class (target 0). A class of one row pairs with itself (its only positive)."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for row, label in enumerate(y):
        by_class.setdefault(label, []).append(row)
    pairs = []
    for _ in range(iterations):
        for row, label in enumerate(y):
            same = [r for r in by_class[label] if r != row] or [row]
            other = [r for c, rows in by_class.items() if c != label for r in rows]
            pairs.append((row, rng.choice(same), 1.0))
            if other:
                pairs.append((row, rng.choice(other), 0.0))
    rng.shuffle(pairs)
    return pairs


def _batch(tokenizer, texts: list[str], max_length: int) -> dict:
    return dict(tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt"))


def contrastive_finetune(
    model,
    tokenizer,
    texts: list[str],
    y: list[int],
    max_length: int,
    iterations: int = 5,
    epochs: int = 1,
    lr: float = 2e-5,
    batch_size: int = 16,
    max_pairs: int | None = None,
    seed: int = 0,
) -> list[float]:
    """SetFit step 1: cosine similarity of each pair's features regressed on its target (1 same class, 0 not).
    Returns the loss per optimiser step."""
    pairs = contrastive_pairs(y, iterations, seed)[:max_pairs]
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(epochs):
        for k in range(0, len(pairs), batch_size):
            chunk = pairs[k : k + batch_size]
            a = forward_features(model, _batch(tokenizer, [texts[i] for i, _, _ in chunk], max_length))  # (B, H)
            b = forward_features(model, _batch(tokenizer, [texts[j] for _, j, _ in chunk], max_length))  # (B, H)
            target = torch.tensor([t for _, _, t in chunk])  # (B,)
            loss = F.mse_loss(F.cosine_similarity(a, b, dim=-1), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    model.eval()
    return losses


def episodic_train(
    model,
    tokenizer,
    texts: list[str],
    y: list[int],
    max_length: int,
    episodes: int,
    n_way: int,
    k_shot: int,
    n_query: int,
    lr: float = 2e-5,
    seed: int = 0,
) -> list[float]:
    """Prototypical networks: per episode, class means of the support features; the query rows are classified
    by their negative squared distance to each mean (cross-entropy). Returns the loss per episode."""
    sampler = EpisodeSampler(y, n_way, k_shot, n_query, seed)
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for episode in sampler.episodes(episodes):
        support, query = episode.support_rows(), episode.query_rows()
        rows = [r for r, _ in support + query]
        feats = forward_features(model, _batch(tokenizer, [texts[r] for r in rows], max_length))  # (S+Q, H)
        s_feats, q_feats = feats[: len(support)], feats[len(support) :]
        centroids = prototypes(s_feats, torch.tensor([j for _, j in support]), n_way)  # (N, H)
        logits = -squared_distances(q_feats, centroids)  # (Q, N)
        loss = F.cross_entropy(logits, torch.tensor([j for _, j in query]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses
