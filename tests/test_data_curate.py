"""data.curate: dedup on planted near-duplicates, contamination, quality rules, PII placeholders, confident
learning on planted flips, and the content-hash cache (tiny inputs, no model)."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest

from keel.data.curate import dedup as dd
from keel.data.curate.label_errors import confident_joint, find_label_issues, out_of_fold_probs
from keel.data.curate.quality import failed_rules, quality_filter
from keel.data.load import RawSplits
from keel.recipe.curate import CurateConfig, DedupConfig, LabelErrorsConfig, PiiConfig, QualityConfig

WORDS = [f"w{i}" for i in range(400)]


def _sentences(n: int, rng: random.Random, length: int = 14) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(length)) for _ in range(n)]


def _near_copy(text: str, rng: random.Random) -> str:
    """One word replaced, different case and punctuation: a near duplicate (Jaccard of 5-shingles ~0.8)."""
    words = text.split()
    words[rng.randrange(len(words))] = rng.choice(WORDS)
    return " ".join(words).upper() + "!!"


def _planted(seed: int = 0):
    rng = random.Random(seed)
    texts = _sentences(200, rng)
    planted = set()
    for _ in range(40):
        planted.add(len(texts))
        texts.append(_near_copy(texts[rng.randrange(200)], rng))
    order = list(range(len(texts)))
    rng.shuffle(order)  # a copy may come before its original: then the original is the one dropped
    return [texts[i] for i in order], order, planted


def test_near_dedup_finds_planted_near_duplicates():
    texts, order, planted = _planted()
    found = dd.near_duplicates(texts, threshold=0.6, shingle=5, num_perm=128, seed=1)
    assert len(found.drop) > 0
    # each planted pair must lose exactly one member; which one depends on the order
    dropped_sources = {order[i] for i in found.drop}
    pair_of = {}
    rng_texts = [None] * len(texts)
    for pos, src in enumerate(order):
        rng_texts[src] = texts[pos]
    for p in planted:
        for src in range(200):
            if dd.normalise(rng_texts[src]).split()[:3] == dd.normalise(rng_texts[p]).split()[:3]:
                pair_of[p] = src
    true_pos = sum(1 for p in planted if p in dropped_sources or pair_of.get(p) in dropped_sources)
    recall = true_pos / len(planted)
    precision = true_pos / len(found.drop)
    assert recall >= 0.9 and precision >= 0.9, (recall, precision)


def test_near_dedup_keeps_distinct_texts_and_exact_dedup_normalises():
    rng = random.Random(3)
    texts = _sentences(100, rng)
    assert dd.near_duplicates(texts, 0.8, 5, 64, 1).drop == []
    found = dd.exact_duplicates(["Hello, World!", "hello world", "hello  world?", "goodbye"])
    assert found.drop == [1, 2] and found.of == {1: 0, 2: 0}


def test_contamination_removes_train_copies_of_held_out_texts_only():
    rng = random.Random(5)
    held = _sentences(30, rng)
    train = _sentences(50, rng) + [_near_copy(held[0], rng), held[1].upper()]
    found = dd.contaminated(train, held, 0.6, 5, 128, 1)
    assert sorted(found.drop) == [50, 51]
    assert found.of[51] == 1 and found.similarity[51] == 1.0


class _Q:
    min_words, max_chars, max_symbol_ratio, max_repeated_ngrams, ngram, max_garbled_ratio = 2, 80, 0.5, 0.5, 2, 0.1


def test_quality_rules_are_counted_per_rule():
    texts = [
        "a fine sentence here",
        "",
        "one",
        "x" * 81 + " y",
        "$$$ %%% ### ok",
        "go go go go go go",
        "bad \ufffd\ufffd",
    ]
    drop, counts, why = quality_filter(texts, _Q)
    assert drop == [1, 2, 3, 4, 5, 6]
    assert counts == {"empty_or_garbled": 2, "too_short": 2, "too_long": 1, "symbols": 1, "repeated_ngrams": 1}
    assert why[4] == ["symbols"] and failed_rules(texts[0], _Q) == []


def test_pii_types_replaced_by_typed_placeholders():
    from keel.data.curate.pii import scrub

    texts = [
        "write to jane.roe@example.com today",
        "call +1 (212) 555-0199 now",
        "see https://example.org/page for more",
        "server at 192.168.10.20 is down",
        "card 4111 1111 1111 1111 was charged",
        "iban GB82 WEST 1234 5698 7654 32 please",
        "no pii in this one at all",
        "card 4111 1111 1111 1112 fails Luhn",
    ]
    out, counts, changed = scrub(texts, PiiConfig())
    assert out[0] == "write to <EMAIL> today"
    assert out[1] == "call <PHONE> now"
    assert "<URL>" in out[2] and "example.org" not in out[2]
    assert out[3] == "server at <IP_ADDRESS> is down"
    assert out[4] == "card <CREDIT_CARD> was charged"
    assert out[5] == "iban <IBAN> please"
    assert out[6] == texts[6] and "<CREDIT_CARD>" not in out[7]
    for kind in ("EMAIL_ADDRESS", "PHONE_NUMBER", "URL", "IP_ADDRESS", "CREDIT_CARD", "IBAN_CODE"):
        assert counts[kind] >= 1, kind
    assert 6 not in changed
    only_email, counts, _ = scrub(texts[:2], PiiConfig(entities=["EMAIL_ADDRESS"]))
    assert only_email[1] == texts[1] and set(counts) == {"EMAIL_ADDRESS"}


def _blobs(n_per_class: int = 80, flip: float = 0.1, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = np.array([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])
    x = np.concatenate([rng.normal(c, 1.0, size=(n_per_class, 2)) for c in centres])  # (n, 2)
    true = np.repeat(np.arange(3), n_per_class)
    given = true.copy()
    flipped = rng.choice(len(true), size=int(flip * len(true)), replace=False)
    given[flipped] = (true[flipped] + rng.integers(1, 3, size=len(flipped))) % 3
    return x, true, given, set(flipped.tolist())


def test_confident_learning_finds_planted_flips():
    x, true, given, flipped = _blobs()
    probs = out_of_fold_probs(x, given, folds=5, seed=0)
    issues, suggested = find_label_issues(given, probs)
    found = set(np.flatnonzero(issues).tolist())
    recall = len(found & flipped) / len(flipped)
    precision = len(found & flipped) / max(len(found), 1)
    assert recall >= 0.85 and precision >= 0.85, (recall, precision)
    assert np.mean(suggested[list(found & flipped)] == true[list(found & flipped)]) >= 0.9


def test_confident_joint_rows_sum_to_label_counts():
    x, _, given, _ = _blobs(flip=0.2, seed=1)
    joint = confident_joint(given, out_of_fold_probs(x, given, 4, 0))
    assert joint.sum(axis=1).tolist() == np.bincount(given).tolist()
    assert np.all(joint.diagonal() > joint.sum(axis=1) * 0.5)
    clean = np.eye(3)[given] * 0.9 + 0.05  # confident and right everywhere: no issues
    assert not find_label_issues(given, clean)[0].any()


def _raw(train: list[str], labels: list[str], test: list[str]) -> RawSplits:
    frame = pd.DataFrame({"text": train, "label": labels})
    held = pd.DataFrame({"text": test, "label": ["a"] * len(test)})
    return RawSplits(frame, held.iloc[:0], held, ["a", "b"], "mem", "0" * 64, [])


def test_curate_splits_removes_from_train_only_and_caches(monkeypatch):
    from keel.data.curate import curate_splits

    rng = random.Random(7)
    base = _sentences(40, rng)
    test = _sentences(5, rng)
    train = [*base, base[0], "mail me: joe@example.com about the weekend plans", test[0], "", "!!!! ????"]
    raw = _raw(train, ["a", "b"] * (len(train) // 2) + ["a"] * (len(train) % 2), test)
    cfg = CurateConfig(dedup=DedupConfig(threshold=0.7))
    out, folder = curate_splits(raw, cfg, "classification")
    assert out.test["text"].tolist() == test  # the test split is read, never cut
    kept = out.train["text"].tolist()
    assert test[0] not in kept and "" not in kept and "!!!! ????" not in kept
    assert kept.count(base[0]) == 1 and any("<EMAIL>" in t for t in kept)
    doc = __import__("json").loads((folder / "curate.json").read_text())
    assert doc["pii"]["counts"]["EMAIL_ADDRESS"] == 1
    assert doc["dedup"]["exact"] == 1 and doc["dedup"]["contamination"] == 1
    assert doc["after"]["train"] == len(kept) and doc["steps"][0]["step"] == "pii"

    import keel.data.curate.pii as pii

    monkeypatch.setattr(pii, "scrub", lambda *a: pytest.fail("a cached result was recomputed"))
    again, folder2 = curate_splits(raw, cfg, "classification")
    assert folder2 == folder and again.train["text"].tolist() == kept


def test_label_errors_relabel_and_drop_on_tfidf():
    from keel.data.curate import curate_splits

    pos = [f"great lovely wonderful day number {i}" for i in range(30)]
    neg = [f"awful terrible horrible night number {i}" for i in range(30)]
    texts = pos + neg
    labels = ["a"] * 30 + ["b"] * 30
    labels[0] = labels[1] = "b"  # planted flips
    raw = _raw(texts, labels, [])
    le = LabelErrorsConfig(features="tfidf", action="relabel", folds=3)
    out, folder = curate_splits(
        raw, CurateConfig(pii=None, quality=None, dedup=None, label_errors=le), "classification"
    )
    assert out.train["label"].tolist()[:2] == ["a", "a"] and out.train["label"].tolist()[2:] == labels[2:]
    le2 = LabelErrorsConfig(features="tfidf", action="drop", folds=3)
    out, _ = curate_splits(raw, CurateConfig(pii=None, quality=None, dedup=None, label_errors=le2), "classification")
    assert len(out.train) == 58 and texts[0] not in out.train["text"].tolist()


def test_config_refuses_out_of_range_and_all_off():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="threshold"):
        DedupConfig(threshold=1.5)
    with pytest.raises(ValidationError, match="every step off"):
        CurateConfig(pii=None, quality=None, dedup=None)
    assert QualityConfig().min_words == 1


def test_report_section_escapes_texts_from_the_data(tmp_path):
    from keel.data.curate import curate_splits
    from keel.data.splits import freeze
    from keel.report.data import section_curation

    evil = "<script>alert(1)</script> mail x@example.com"
    raw = _raw(["hello there friend", "hello there friend", evil, "another good text"], ["a", "b", "a", "b"], [])
    out, folder = curate_splits(raw, CurateConfig(), "classification")
    freeze(tmp_path, out, folder)
    page = section_curation(tmp_path, {})
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "&lt;EMAIL&gt;" in page and "PERSON" in page and "exact duplicates" in page
    assert section_curation(tmp_path / "nothing", {}) is None
