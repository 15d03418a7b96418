"""data.augment: each operation does what EDA says, labels are kept, copies are seeded, only train grows."""

from __future__ import annotations

import random

import pytest

from keel.augment import text as aug

TEXT = "The car was great and the trip was really fast, he said to his friend."


def cfg(**kw):
    from keel.recipe.label import AugmentConfig

    return AugmentConfig(**kw)


def test_synonym_replacement_uses_the_table_and_keeps_case_and_punctuation():
    r = random.Random(0)
    out = aug.synonym_replace("Great trip!", r, alpha=1.0)
    a, b = out.split()
    assert a[0].isupper() and a.lower() in aug.synonyms()["great"] and b[-1] == "!"
    assert b[:-1] in aug.synonyms()["trip"]
    assert aug.synonym_replace("zzz qqq", r, 1.0) == "zzz qqq"  # nothing in the table: unchanged


def test_no_synonym_group_mixes_polarity():
    table = aug.synonyms()
    for good, bad in [("great", "terrible"), ("good", "bad"), ("happy", "sad"), ("love", "hate")]:
        assert bad not in table[good] and good not in table[bad]


def test_swap_insert_delete_change_words_as_eda_does():
    r = random.Random(0)
    words = TEXT.split()
    swapped = aug.random_swap(TEXT, r, 0.2).split()
    assert sorted(swapped) == sorted(words) and swapped != words
    inserted = aug.random_insert(TEXT, r, 0.2).split()
    assert len(inserted) == len(words) + round(0.2 * len(words))
    assert all(w in inserted for w in words)
    deleted = aug.random_delete(TEXT, r, 0.3).split()
    assert 1 <= len(deleted) < len(words) and all(w in words for w in deleted)
    assert aug.random_delete("one", r, 0.99) == "one"  # one word always stays


def test_typo_noise_touches_letters_only_at_its_rate():
    r = random.Random(0)
    assert aug.typo_noise(TEXT, r, 0.0) == TEXT
    noisy = aug.typo_noise("a" * 2000, r, 0.1)
    assert noisy != "a" * 2000 and abs(len(noisy) - 2000) < 200
    assert aug.typo_noise("123 456 !!!", r, 1.0) == "123 456 !!!"


def test_identity_swap_is_the_fairness_lexicon_swap():
    from keel.trust import lexicon

    assert aug.identity_swap(TEXT, ["gender"]) == lexicon.swap_terms(TEXT, ["gender"]).text
    assert "she said to her friend" in aug.identity_swap(TEXT, ["gender"])
    assert aug.identity_swap("the road was long", ["gender"]) is None


def test_copies_are_seeded_and_name_their_source():
    texts = [TEXT, "My trip on the new bus was awful", "ok"]
    c = cfg(ops=["synonym", "insert", "swap", "delete"], copies=3, seed=7)
    first, counts = aug.augment_texts(texts, c)
    again, _ = aug.augment_texts(texts, c)
    other, _ = aug.augment_texts(texts, cfg(ops=["synonym", "insert", "swap", "delete"], copies=3, seed=8))
    assert first == again and first != other
    assert sum(counts.values()) == len(first) and 0 < len(first) <= 3 * len(texts)
    assert all(t != texts[i] for i, t, _ in first)  # a copy equal to its source is not added
    assert {i for i, _, _ in first} <= {0, 1, 2}


def test_identity_copies_one_per_text_that_names_a_term():
    c = cfg(ops=["identity"], seed=0)
    copies, counts = aug.augment_texts([TEXT, "the road was long"], c, ["gender"])
    assert [(i, op) for i, _, op in copies] == [(0, "identity")] and counts == {"identity": 1}


def test_paraphrase_needs_asking_and_a_known_model():
    from pydantic import ValidationError

    assert "paraphrase" not in cfg().ops
    with pytest.raises(ValidationError, match="copies"):
        cfg(copies=0)
    with pytest.raises(ValidationError, match="alpha"):
        cfg(alpha=0.9)
    with pytest.raises(ValidationError, match="ops"):
        cfg(ops=["synonym", "shout"])


def test_paraphrase_copies_come_from_the_causal_lm_only_when_listed(monkeypatch):
    calls = []

    def fake(texts, model, seed):  # the LM itself is exercised below on tiny-llama; here: what is asked of it
        calls.append((list(texts), model))
        return [t.upper() for t in texts]

    import keel.augment.paraphrase

    monkeypatch.setattr(keel.augment.paraphrase, "paraphrase", fake)
    texts = ["a calm trip", "a long road", "the bus"]
    copies, counts = aug.augment_texts(texts, cfg(ops=["synonym"], copies=1))
    assert calls == [] and "paraphrase" not in counts
    copies, counts = aug.augment_texts(texts, cfg(ops=["paraphrase"], max_paraphrases=2, paraphrase_model="tiny-llama"))
    assert len(calls) == 1 and len(calls[0][0]) == 2 and calls[0][1] == "tiny-llama"
    assert counts == {"paraphrase": 2} and all(t == texts[i].upper() for i, t, _ in copies)


@pytest.mark.slow  # builds and runs a (tiny) causal LM
def test_the_paraphraser_returns_one_line_per_text():
    from keel.augment.paraphrase import paraphrase

    out = paraphrase(["the trip was great", "the bus was late"], "tiny-llama", seed=0, batch_size=2)
    assert len(out) == 2 and all(isinstance(t, str) and "\n" not in t for t in out)


def test_augment_and_weak_settings_reuse_the_tokenized_cache(tmp_path, tiny_recipe):
    from transformers import AutoTokenizer

    from keel.data.prepare import prepare_data
    from keel.models.registry import model_dir
    from keel.recipe import load_recipe

    tok = AutoTokenizer.from_pretrained(model_dir("tiny-bert"))
    path = tiny_recipe()
    first = prepare_data(load_recipe(path), tok)
    again = prepare_data(load_recipe(path, ["data.augment.copies=2", "data.weak.functions=tweets-sentiment"]), tok)
    assert again.cache_hit and again.meta["key"] == first.meta["key"]  # the copies are made after the cache
