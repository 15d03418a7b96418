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


def _four_clusters(rng, sizes=(10, 10, 10, 10), spread=0.01):
    centres = np.eye(8)[:4] * 10
    return np.concatenate([c + spread * rng.normal(size=(n, 8)) for c, n in zip(centres, sizes)])


def test_badge_takes_the_most_uncertain_first_then_spreads_where_margin_spends_on_one_cluster():
    rng = np.random.default_rng(2)
    emb = _four_clusters(rng)  # (40, 8)
    rows = ([0.34, 0.33, 0.33], [0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.9, 0.05, 0.05])
    probs = np.concatenate([np.tile(p, (10, 1)) for p in rows]) + 1e-4 * rng.random((40, 3))
    probs /= probs.sum(1, keepdims=True)
    by_margin = select(probs, 4, "margin", np.random.default_rng(0), emb)
    assert {i // 10 for i in by_margin} == {0}
    for seed in range(5):
        picked = select(probs, 4, "badge", np.random.default_rng(seed), emb)
        assert picked[0] // 10 == 0  # the largest gradient: the probe's least sure cluster
        assert sorted(i // 10 for i in picked) == [0, 1, 2, 3]


def test_typiclust_covers_every_cluster_with_its_most_typical_text():
    rng = np.random.default_rng(4)
    emb = _four_clusters(rng, sizes=(40, 30, 20, 10), spread=0.3)
    emb[0] = np.eye(8)[0] * 10 + 2.5  # cluster 0's outlier: far from its neighbours, so least typical
    flat = np.full((len(emb), 3), 1 / 3)
    picked = select(flat, 4, "typiclust", np.random.default_rng(0), emb)
    starts = np.cumsum([0, 40, 30, 20])
    assert sorted(int(np.searchsorted(starts, i, side="right")) - 1 for i in picked) == [0, 1, 2, 3]
    assert 0 not in picked
    centre = np.eye(8)[0] * 10
    chosen0 = next(i for i in picked if i < 40)
    # the densest of cluster 0: nearer its centre than most of its members
    dist = np.linalg.norm(emb[1:40] - centre, axis=1)
    assert np.linalg.norm(emb[chosen0] - centre) <= np.quantile(dist, 0.25)


def test_typiclust_skips_the_clusters_that_already_hold_labels():
    rng = np.random.default_rng(5)
    emb = _four_clusters(rng, sizes=(30, 30, 5, 5), spread=0.1)
    labelled = emb[[0, 30]]  # one label in each large cluster: the two small ones are what is left to cover
    pool = np.delete(emb, [0, 30], axis=0)  # (68, 8): rows 0-57 the large clusters, 58-67 the small ones
    picked = select(np.full((68, 3), 1 / 3), 2, "typiclust", np.random.default_rng(0), pool, labelled)
    assert sorted(i >= 63 for i in picked) == [False, True] and all(i >= 58 for i in picked)
    # without the labels it would spend the batch on the large clusters
    unaware = select(np.full((68, 3), 1 / 3), 2, "typiclust", np.random.default_rng(0), pool)
    assert all(i < 58 for i in unaware)


def test_cross_validated_c_follows_the_labelled_data():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(60, 6))
    noise = rng.integers(0, 2, size=60)  # labels unrelated to x: the strongest regularisation fits best
    clean = (x[:, 0] > 0).astype(np.int64)
    x_sep = x + 3 * np.sign(x[:, :1]) * np.eye(6)[0]  # separable with a wide margin: the weakest fits best
    from keel.label.probe import C_GRID

    assert Probe(2, c="cv").fit(x, noise).c_ == min(C_GRID)
    assert Probe(2, c="cv").fit(x_sep, clean).c_ == max(C_GRID)
    assert Probe(2, c="cv").fit(x[:3], np.array([0, 1, 1])).c_ == 1.0  # a label with one example: no folds


def test_balanced_shares_the_batch_between_predicted_labels_where_margin_spends_it_on_one():
    rng = np.random.default_rng(7)
    # label 0's texts are the most borderline; labels 1 and 2 are less so, label 2 least
    probs = np.concatenate(
        [
            np.tile([0.45, 0.40, 0.15], (10, 1)),
            np.tile([0.25, 0.55, 0.20], (10, 1)),
            np.tile([0.10, 0.25, 0.65], (10, 1)),
        ]
    ) + 1e-4 * rng.random((30, 3))
    probs /= probs.sum(1, keepdims=True)
    by_margin = select(probs, 6, "margin", np.random.default_rng(0))
    assert {i // 10 for i in by_margin} == {0}
    picked = select(probs, 6, "balanced", np.random.default_rng(0))
    assert sorted(i // 10 for i in picked) == [0, 0, 1, 1, 2, 2]
    # within each label, the smallest margins first (as margin sampling would rank them)
    gaps = -uncertainty(probs, "margin")
    for label in range(3):
        mine = [i for i in picked if i // 10 == label]
        assert sorted(gaps[mine]) == sorted(np.sort(gaps[label * 10 : label * 10 + 10])[:2])
    # a label with too few candidates leaves its share to the others
    assert len(set(select(probs[:12], 6, "balanced", np.random.default_rng(0)))) == 6
