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


def test_probcover_covers_every_cluster_before_a_second_text_from_any():
    rng = np.random.default_rng(8)
    emb = _four_clusters(rng, sizes=(40, 30, 20, 10), spread=0.3)  # the balls: one cluster each
    picked = select(np.full((100, 3), 1 / 3), 4, "probcover", np.random.default_rng(0), emb)
    starts = np.cumsum([0, 40, 30, 20])
    assert sorted(int(np.searchsorted(starts, i, side="right")) - 1 for i in picked) == [0, 1, 2, 3]
    # the largest cluster's ball covers the most: it comes first
    assert picked[0] < 40


def test_probcover_counts_what_the_labels_already_cover():
    rng = np.random.default_rng(9)
    emb = _four_clusters(rng, sizes=(40, 30, 20, 10), spread=0.3)
    labelled, pool = emb[[0, 40]], np.delete(emb, [0, 40], axis=0)  # the two largest clusters hold a label
    picked = select(np.full((98, 3), 1 / 3), 2, "probcover", np.random.default_rng(0), pool, labelled)
    assert all(i >= 68 for i in picked)  # rows 68.. are the two small clusters, the only ones left uncovered
    unaware = select(np.full((98, 3), 1 / 3), 2, "probcover", np.random.default_rng(0), pool)
    assert all(i < 68 for i in unaware)


def test_cluster_margin_takes_one_uncertain_text_per_cluster_where_margin_takes_one_clusters():
    rng = np.random.default_rng(10)
    emb = _four_clusters(rng)  # (40, 8)
    # cluster 0 the most borderline; 1 and 2 next; 3 sure (outside the 10 x 3 candidates kept)
    rows = ([0.40, 0.38, 0.22], [0.45, 0.35, 0.20], [0.50, 0.32, 0.18], [0.9, 0.05, 0.05])
    probs = np.concatenate([np.tile(p, (10, 1)) for p in rows]) + 1e-4 * rng.random((40, 3))
    probs /= probs.sum(1, keepdims=True)
    assert {i // 10 for i in select(probs, 3, "margin", np.random.default_rng(0), emb)} == {0}
    for seed in range(3):
        picked = select(probs, 3, "cluster-margin", np.random.default_rng(seed), emb)
        assert sorted(i // 10 for i in picked) == [0, 1, 2]


def test_density_prefers_an_unsure_typical_text_to_an_unsure_outlier():
    rng = np.random.default_rng(11)
    emb = _four_clusters(rng, sizes=(30, 10, 0, 0), spread=0.3)  # (40, 8)
    emb[35] = np.eye(8)[7] * 10  # an outlier, as unsure as the most unsure
    probs = np.tile([0.8, 0.1, 0.1], (40, 1))
    probs[[5, 35]] = [0.5, 0.45, 0.05]  # the two most borderline: a typical text and the outlier
    assert select(probs, 1, "density", np.random.default_rng(0), emb) == [5]
    assert set(select(probs, 2, "margin", np.random.default_rng(0), emb)) == {5, 35}
    assert 35 not in select(probs, 2, "density", np.random.default_rng(0), emb)


def _two_chains(n=30):
    """Two parallel chains of points (labels 0 and 1) on a large constant offset, as L2-normalised embeddings
    roughly are: each chain's far end lies nearer the other chain's labelled end than its own."""
    t = np.linspace(0, 10, n)
    a = np.stack([np.zeros(n), t, np.full(n, 30.0)], 1)
    b = np.stack([np.full(n, 6.0), t[::-1], np.full(n, 30.0)], 1)  # b's labelled end (t=10) sits opposite a's
    return a, b


def test_spread_carries_the_labels_along_the_pool_where_the_plain_probe_cuts_across():
    a, b = _two_chains()
    x_lab, y = np.stack([a[0], b[0]]), np.array([0, 1])  # one label at the start of each chain
    x_unl = np.concatenate([a[1:], b[1:]])
    far = np.stack([a[-1], b[-1]])  # each chain's far end: nearer the other chain's label
    plain = Probe(2, c=10.0).fit(x_lab, y, x_unl)  # semi="none": the pool is ignored
    assert plain.predict_proba(far).argmax(1).tolist() == [1, 0]
    spread = Probe(2, c=10.0, semi="spread").fit(x_lab, y, x_unl)
    assert spread.predict_proba(far).argmax(1).tolist() == [0, 1]


def test_self_training_refits_on_the_most_confident_half_of_the_pool_with_its_own_guesses():
    from sklearn.linear_model import LogisticRegression

    from keel.label.semi import pseudo_labelled

    rng = np.random.default_rng(12)
    x_lab = np.array([[-1.0, 0.0], [1.0, 0.0]])
    y = np.array([0, 1])
    x_unl = rng.normal(size=(40, 2))
    model = LogisticRegression().fit(x_lab, y)
    xs, ys, ws = pseudo_labelled("self-train", model, x_lab, y, x_unl, 2)
    conf = model.predict_proba(x_unl).max(1)
    kept = conf >= np.median(conf)
    assert len(xs) == 2 + kept.sum() and np.allclose(xs[2:], x_unl[kept])
    assert ys[2:].tolist() == model.predict(x_unl[kept]).tolist() and np.allclose(ws[2:], conf[kept])
    assert ws[:2].tolist() == [1.0, 1.0] and ys[:2].tolist() == [0, 1]


def test_the_test_split_refit_reproduces_the_simulated_rounds():
    from keel.label.simulate import score_rounds, simulate

    rng = np.random.default_rng(13)
    x = _four_clusters(rng, sizes=(15, 15, 15, 15), spread=2.0)
    y = np.repeat([0, 1, 2, 0], 15)
    evals = {"val": (x[::3], y[::3])}
    for semi in ("none", "self-train"):
        order, curve = simulate(x, y, evals, "margin", 3, 4, 4, 12, 0, "probcover", 1.0, semi)
        assert len(order) == len(set(order)) == 12 and [p["labels"] for p in curve] == [4, 8, 12]
        again = score_rounds(x, y, order, [4, 8, 12], *evals["val"], 3, 0, 1.0, semi)
        assert again == [p["val"] for p in curve]
