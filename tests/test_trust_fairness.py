"""Fairness: metrics against hand-computed values on a planted disparity, Borkan AUCs against pair counting,
symmetric counterfactual swaps, ThresholdOptimizer, gates."""

import itertools

import numpy as np
import pytest

from keel.recipe import FairnessConfig, FairnessGates
from keel.trust import fairness as fair
from keel.trust import lexicon


def planted():
    """Group a: 40 rows, group b: 40 rows, group c: 5 rows (too small to rank). Binary labels 0/1, positive = 1."""
    # a: y = 20 pos / 20 neg; predicted positive: 18 of the positives, 2 of the negatives
    ya = np.r_[np.ones(20), np.zeros(20)].astype(int)
    pa = np.r_[np.ones(18), np.zeros(2), np.ones(2), np.zeros(18)].astype(int)
    # b: y = 20 pos / 20 neg; predicted positive: 10 of the positives, 8 of the negatives
    yb = ya.copy()
    pb = np.r_[np.ones(10), np.zeros(10), np.ones(8), np.zeros(12)].astype(int)
    yc, pc = np.array([1, 1, 0, 0, 0]), np.array([0, 0, 1, 1, 1])
    y, p = np.r_[ya, yb, yc], np.r_[pa, pb, pc]
    g = np.array(["a"] * 40 + ["b"] * 40 + ["c"] * 5)
    return y, p, g


def test_group_metrics_equal_hand_computed_values():
    y, p, g = planted()
    t = fair.group_table(y, p, g, pos=1, min_group_size=30)
    by = {r["group"]: r for r in t["groups"]}
    # hand-computed: selection rate a = 20/40, b = 18/40; TPR a = 18/20, b = 10/20; FPR a = 2/20, b = 8/20
    assert by["a"]["selection_rate"] == pytest.approx(0.5) and by["b"]["selection_rate"] == pytest.approx(0.45)
    assert by["a"]["tpr"] == pytest.approx(0.9) and by["b"]["tpr"] == pytest.approx(0.5)
    assert by["a"]["fpr"] == pytest.approx(0.1) and by["b"]["fpr"] == pytest.approx(0.4)
    assert by["a"]["accuracy"] == pytest.approx(36 / 40) and by["b"]["accuracy"] == pytest.approx(22 / 40)
    assert by["a"]["n"] == 40 and by["c"]["n"] == 5
    # c is flagged and left out of the differences (with c, DP would be 0.6 - 0.45 and EO 1.0)
    assert not by["c"]["ranked"] and "fewer than 30" in by["c"]["flag"]
    assert t["ranked_groups"] == ["a", "b"]
    assert t["demographic_parity_difference"] == pytest.approx(0.05)
    assert t["equalized_odds_difference"] == pytest.approx(max(0.9 - 0.5, 0.4 - 0.1))
    assert t["worst_group_accuracy"] == pytest.approx(22 / 40)


def _pair_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    wins = sum((a > b) + 0.5 * (a == b) for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_borkan_aucs_equal_pair_counting():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    member = rng.random(200) < 0.3
    s = np.clip(0.5 * y + rng.normal(0, 0.3, 200) - 0.2 * member, 0, 1)  # the subgroup is scored lower
    got = fair.borkan_aucs(y, s, member)
    bg = ~member
    assert got["subgroup_auc"] == pytest.approx(_pair_auc(y[member], s[member]))
    bpsn = (bg & (y == 1)) | (member & (y == 0))
    bnsp = (bg & (y == 0)) | (member & (y == 1))
    assert got["bpsn_auc"] == pytest.approx(_pair_auc(y[bpsn], s[bpsn]))
    assert got["bnsp_auc"] == pytest.approx(_pair_auc(y[bnsp], s[bnsp]))
    assert got["bnsp_auc"] < got["bpsn_auc"]  # lower scores for the subgroup: its positives look negative


def test_counterfactual_swaps_are_symmetric():
    doc = lexicon.load_lexicon()
    cats = lexicon.categories()
    for pairs in doc["swaps"].values():
        for a, b in pairs:
            for x, y in ((a, b), (b, a)):
                for form in (str.lower, str.title, str.upper):
                    text = f"{form(x)} said so."
                    swap = lexicon.swap_terms(text, cats)
                    assert swap.n == 1 and swap.text == f"{form(y)} said so."
                    assert lexicon.swap_terms(swap.text, cats).text == text
    text = "She told his Mother that Christians and Muslims in the church are young; history is Shell's."
    once = lexicon.swap_terms(text, cats)
    assert once.n == 7 and "history" in once.text and "Shell" in once.text  # whole words only
    assert once.text.startswith("He told her Father")
    assert lexicon.swap_terms(once.text, cats).text == text
    assert lexicon.swap_terms("nothing to see here", cats) == ("nothing to see here", 0, ())


@pytest.mark.parametrize(
    "text, expected",
    [
        ("his mother called", "her father called"),  # determiner his -> her (not 'hers father')
        ("her mother called", "his father called"),  # determiner her -> his
        ("I saw her.", "I saw him."),  # object her -> him
        ("he told her about it", "she told him about it"),
        ("I saw him yesterday", "I saw her yesterday"),
        ("the book is his.", "the book is hers."),  # standalone his -> hers
        ("the book is hers", "the book is his"),
        ("His and hers", "Hers and his"),
        ("she loves her own dog", "he loves his own dog"),
        ("HER DOG BARKED", "HIS DOG BARKED"),
        ("she fed her 3 cats", "he fed his 3 cats"),
    ],
)
def test_pronouns_swap_by_their_role(text, expected):
    swap = lexicon.swap_terms(text, lexicon.categories())
    assert swap.text == expected and not swap.ambiguous


def test_a_pronoun_of_ambiguous_role_gets_no_counterfactual():
    # 'gave her flowers': 'him flowers' or 'his flowers'? No grammatical swap can be sure: skipped, and counted
    swap = lexicon.swap_terms("I gave her flowers", lexicon.categories())
    assert swap.text is None and swap.n == 0 and swap.ambiguous == ("her",)
    assert lexicon.swap_terms("I gave her flowers", ["religion"]) == ("I gave her flowers", 0, ())  # gender not swapped


def test_lexicon_groups_and_unknown_category():
    assert lexicon.groups_in("My grandmother is a Muslim", "religion") == ["muslim"]
    assert lexicon.group_label("he and she", "gender") == "several"
    assert lexicon.group_label("a car", "gender") == "none"
    assert set(lexicon.categories()) == {
        "gender",
        "race/ethnicity",
        "religion",
        "sexual orientation",
        "disability",
        "age",
    }
    from keel.errors import RecipeError

    with pytest.raises(RecipeError, match="unknown"):
        lexicon.categories(["gendr"])


def test_threshold_optimizer_narrows_a_planted_gap():
    rng = np.random.default_rng(1)

    def split(n):
        g = np.where(rng.random(n) < 0.5, "a", "b")
        y = rng.integers(0, 2, n)
        s = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.12, n) + np.where(g == "b", -0.25, 0.0), 0, 1)  # b scored lower
        return {"y": y, "score": s, "group": g}

    fit, test = split(800), split(800)
    res = fair.threshold_optimizer(fit, test, "equalized_odds", min_group_size=30)
    assert res["applied"]
    before, after = res["before"]["equalized_odds_difference"], res["after"]["equalized_odds_difference"]
    assert before > 0.3 and after < before / 2


def test_audit_end_to_end_on_arrays_and_gates():
    y, p, g = planted()
    probs = np.stack([1 - p * 0.8 - 0.1, p * 0.8 + 0.1], axis=1)  # (N, 2)
    texts = [f"text {i}" for i in range(len(y))]
    cfg = FairnessConfig(groups="column", min_group_size=30, counterfactual=False)
    doc = fair.audit(texts, y, probs, ["neg", "pos"], cfg, None, column=list(g))
    assert doc["positive_label"] == "pos"
    assert doc["attributes"]["group"]["equalized_odds_difference"] == pytest.approx(0.4)
    assert {s["subgroup"] for s in doc["subgroup_aucs"]} == {"group=a", "group=b", "group=c"}
    fails = fair.check_gates(doc, FairnessGates(max_equalized_odds_difference=0.1))
    assert len(fails) == 1 and "equalized odds difference 0.400" in fails[0] and "0.1" in fails[0]
    assert fair.check_gates(doc, FairnessGates(max_equalized_odds_difference=0.5)) == []
    assert fair.check_gates(doc, FairnessGates(min_group_accuracy=0.6))  # b's accuracy is 0.55


def test_counterfactual_flip_rate_with_a_biased_scorer():
    texts = ["he drove the car", "she drove the car", "the car is fine", "his mother called", "we gave her flowers"]

    def biased(batch):  # P(pos) depends only on whether 'she'/'mother' appears
        s = np.array([0.2 if any(w in t.split() for w in ("she", "mother")) else 0.8 for t in batch])
        return np.stack([1 - s, s], axis=1)

    out = fair.counterfactual(texts, biased(texts), biased, lexicon.categories(), pos=1)
    assert out["gender"]["n"] == 3 and out["religion"]["n"] == 0
    assert out["gender"]["ambiguous"] == 1  # 'gave her flowers' is left out, and counted
    # he->she flips, she->he flips, 'his mother' -> 'her father' flips (mother present before only)
    assert out["gender"]["flip_rate"] == pytest.approx(1.0)
    assert out["gender"]["mean_score_change"] == pytest.approx((-0.6 + 0.6 + 0.6) / 3)
    assert {e["counterfactual"] for e in out["gender"]["examples"]} >= {"her father called"}


def test_gates_with_nothing_to_measure_are_named():
    y, p, g = planted()
    probs = np.stack([1 - p * 0.8 - 0.1, p * 0.8 + 0.1], axis=1)  # (N, 2)
    texts = [f"text {i}" for i in range(len(y))]
    doc = fair.audit(
        texts,
        y,
        probs,
        ["neg", "pos"],
        FairnessConfig(groups="column", min_group_size=50, counterfactual=False),
        None,
        column=list(g),
    )
    gates = FairnessGates(max_equalized_odds_difference=0.1, min_subgroup_auc=0.5, max_counterfactual_flip_rate=0.1)
    assert fair.check_gates(doc, gates) == []  # nothing crossed ...
    lines = fair.unmeasurable_gates(doc, gates)  # ... because nothing could be measured
    assert len(lines) == 3
    assert lines[0].startswith("audit.gates.max_equalized_odds_difference: no attribute has two groups with 50+")
    assert "a 40" in lines[0] and "counterfactual is off" in lines[2]
    ok = fair.audit(
        texts,
        y,
        probs,
        ["neg", "pos"],
        FairnessConfig(groups="column", min_group_size=30, counterfactual=False),
        None,
        column=list(g),
    )
    assert fair.unmeasurable_gates(ok, FairnessGates(max_equalized_odds_difference=0.1)) == []
    assert fair.unmeasurable_gates(ok, FairnessGates()) == []


def test_stored_thresholds_rebuild_fairlearns_own_decision_rule():
    import json

    from fairlearn.postprocessing import ThresholdOptimizer

    from keel.trust import mitigation

    rng = np.random.default_rng(2)
    n = 600
    g = np.where(rng.random(n) < 0.5, "female", "male")
    y = rng.integers(0, 2, n)
    s = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.15, n) + np.where(g == "male", -0.2, 0.0), 0, 1)
    opt = ThresholdOptimizer(
        estimator=fair.score_estimator(), constraints="equalized_odds", prefit=True, predict_method="predict_proba"
    ).fit(s.reshape(-1, 1), y, sensitive_features=g)
    doc = json.loads(json.dumps({"thresholds": mitigation.interpolation_json(opt)}))  # through JSON, as stored
    rebuilt = mitigation.thresholder(doc)
    probe = np.linspace(0, 1, 101)
    for group in ("female", "male"):
        sens = np.full(len(probe), group)
        expected = opt._pmf_predict(probe.reshape(-1, 1), sensitive_features=sens)
        np.testing.assert_allclose(rebuilt._pmf_predict(probe.reshape(-1, 1), sensitive_features=sens), expected)
    texts = [f"text {i}" for i in range(n)]
    d = mitigation.decide(rebuilt, list(g), texts, s, ["female", "male"])
    assert set(d) <= {0, 1} and (d == mitigation.decide(rebuilt, list(g), texts, s, ["female", "male"])).all()
    assert (mitigation.decide(rebuilt, ["none"] * n, texts, s, ["female", "male"]) == -1).all()  # no group: untouched
