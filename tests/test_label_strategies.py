"""Active-learning strategies and the probe, against independent oracles (scipy's entropy, sorted gaps)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import entropy

from keel.label.probe import Probe
from keel.label.strategies import STRATEGIES, select, uncertainty


@pytest.fixture
def probs():
    return np.random.default_rng(0).dirichlet([0.7, 0.7, 0.7, 0.7], size=200)  # (200, 4)


def _oracle(probs, strategy):
    if strategy == "least-confidence":
        return 1 - probs.max(1)
    if strategy == "margin":
        s = np.sort(probs, 1)
        return -(s[:, -1] - s[:, -2])
    return entropy(probs, axis=1)


@pytest.mark.parametrize("strategy", ["least-confidence", "margin", "entropy"])
def test_uncertainty_picks_what_the_oracle_ranks_first(probs, strategy):
    picked = select(probs, 10, strategy, np.random.default_rng(0))
    assert picked == list(np.argsort(-_oracle(probs, strategy), kind="stable")[:10])
    np.testing.assert_allclose(
        np.argsort(-uncertainty(probs, strategy))[:10], np.argsort(-_oracle(probs, strategy))[:10]
    )


def test_the_three_scores_disagree_on_a_random_pool(probs):
    # a strategy wired to another's score would pass the oracle test above only if they agreed here
    firsts = {tuple(select(probs, 10, s, np.random.default_rng(0))) for s in ("least-confidence", "margin", "entropy")}
    assert len(firsts) == 3


def test_diverse_spreads_one_batch_over_clusters_entropy_spends_on_one():
    rng = np.random.default_rng(1)
    centres = np.eye(8)[:4] * 10
    emb = np.concatenate([c + 0.01 * rng.normal(size=(10, 8)) for c in centres])  # (40, 8): four tight clusters
    # cluster 0 the most uncertain, then 1, then 2, then 3 (outside the 10 x 3 candidates Zhdanov's filter keeps)
    rows = ([0.34, 0.33, 0.33], [0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.9, 0.05, 0.05])
    probs = np.concatenate([np.tile(p, (10, 1)) for p in rows])
    probs = probs + 1e-4 * rng.random(probs.shape)
    probs /= probs.sum(1, keepdims=True)
    by_entropy = select(probs, 3, "entropy", np.random.default_rng(0), emb)
    diverse = select(probs, 3, "diverse", np.random.default_rng(0), emb)
    assert {i // 10 for i in by_entropy} == {0}
    assert sorted(i // 10 for i in diverse) == [0, 1, 2]
    assert diverse[0] // 10 == 0  # the most uncertain cluster's pick comes first


def test_random_draws_distinct_rows_and_every_strategy_caps_at_the_pool():
    probs = np.full((5, 2), 0.5)
    for s in STRATEGIES:
        picked = select(probs, 10, s, np.random.default_rng(0), np.eye(5))
        assert sorted(picked) == [0, 1, 2, 3, 4]


def test_probe_with_one_label_seen_answers_it_and_with_two_learns():
    x = np.array([[0.0, 1.0], [0.1, 0.9], [1.0, 0.0], [0.9, 0.1]])
    one = Probe(3).fit(x[:2], np.array([2, 2]))
    assert one.predict_proba(x).argmax(1).tolist() == [2, 2, 2, 2]
    two = Probe(3).fit(x, np.array([2, 2, 0, 0]))
    p = two.predict_proba(x)
    assert p.shape == (4, 3) and np.allclose(p[:, 1], 0) and p.argmax(1).tolist() == [2, 2, 0, 0]
