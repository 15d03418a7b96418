"""Counterfactual data augmentation (training-time mitigation): every training text that mentions a
swappable identity term is added once more with the terms swapped (he -> she, Christian -> Muslim, ...)
and the same label, so the model sees both versions equally often."""

from __future__ import annotations

from keel.progress import log
from keel.trust import lexicon


def augment(train_ds, tokenizer, recipe):
    import datasets

    cats = lexicon.categories(recipe.audit.fairness.categories)
    texts, new = train_ds["text"], {"text": [], "label": []}
    has_group = "group" in train_ds.column_names
    if has_group:
        new["group"] = []
    for i, text in enumerate(texts):
        swapped, n = lexicon.swap_terms(text, cats)
        if n:
            new["text"].append(swapped)
            new["label"].append(train_ds[i]["label"])
            if has_group:
                new["group"].append(train_ds[i]["group"])
    if not new["text"]:
        log("counterfactual augmentation: no training text mentions a swappable identity term; nothing added")
        return train_ds
    enc = tokenizer(new["text"], truncation=True, max_length=recipe.model.max_length)
    for col in ("input_ids", "token_type_ids"):
        if col in train_ds.column_names:
            new[col] = enc[col]
    extra = datasets.Dataset.from_dict(new).cast(train_ds.features)
    log(f"counterfactual augmentation: {len(extra)} swapped copies added to {len(train_ds)} training texts")
    return datasets.concatenate_datasets([train_ds, extra])
