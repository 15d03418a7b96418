"""Counterfactual data augmentation (training-time mitigation): every training text that mentions a
swappable identity term is added once more with the terms swapped (he -> she, Christian -> Muslim, ...)
and the same label, so the model sees both versions equally often. A text whose pronoun role is ambiguous
("gave her flowers": his or him?) gets no copy; how many were skipped is logged."""

from __future__ import annotations

import logging

from keel.trust import lexicon

logger = logging.getLogger(__name__)


def swap_sources(texts: list[str], recipe) -> list[tuple[int, str]]:
    """(index, swapped text) for every text that gets a counterfactual copy, in order.

    DP-SGD reads the same list to know which person each copy belongs to (keel/trust/privacy.py).
    """
    cats = lexicon.categories(recipe.audit.fairness.categories)
    out = []
    for i, text in enumerate(texts):
        swap = lexicon.swap_terms(text, cats)
        if swap.n:
            out.append((i, swap.text))
    return out


def augment(train_ds, tokenizer, recipe):
    import datasets

    texts = list(train_ds["text"])
    sources = swap_sources(texts, recipe)
    cats = lexicon.categories(recipe.audit.fairness.categories)
    ambiguous = sum(1 for t in texts if lexicon.swap_terms(t, cats).ambiguous)
    if ambiguous:
        logger.info(
            f"counterfactual augmentation: {ambiguous} texts skipped (a pronoun whose role, his or him, is ambiguous)"
        )
    if not sources:
        logger.info("counterfactual augmentation: no training text mentions a swappable identity term; nothing added")
        return train_ds
    idx = [i for i, _ in sources]
    new = {"text": [s for _, s in sources], "label": [train_ds[i]["label"] for i in idx]}
    if "group" in train_ds.column_names:
        new["group"] = [train_ds[i]["group"] for i in idx]
    enc = tokenizer(new["text"], truncation=True, max_length=recipe.model.max_length)
    for col in ("input_ids", "token_type_ids"):
        if col in train_ds.column_names:
            new[col] = enc[col]
    extra = datasets.Dataset.from_dict(new).cast(train_ds.features)
    logger.info(f"counterfactual augmentation: {len(extra)} swapped copies added to {len(train_ds)} training texts")
    return datasets.concatenate_datasets([train_ds, extra])
