"""Preference pairs: a user's JSONL (`prompt`, `chosen`, `rejected`) or the built-in CrowS-Pairs preferences.

From CrowS-Pairs, each pair prefers the less stereotypical sentence: the words both sentences share at
the start are the prompt, the rest of ``sent_less`` is chosen and the rest of ``sent_more`` rejected.
Prompts start with the tokenizer's BOS text, so the DPO margin is the CrowS-Pairs log-likelihood margin.
The split is by pair (a pair's sentences never land in two splits), deterministic in data.split.seed.
"""

from __future__ import annotations

import random
from pathlib import Path

from keel.data.load import read_jsonl
from keel.errors import DataError
from keel.recipe import DataConfig

FIELDS = ("prompt", "chosen", "rejected")


def crows_preferences(lead: str) -> list[dict]:
    from keel.data.builtin import DATASETS

    spec = DATASETS["crows-pairs"]
    frame = spec.read(spec.paths())
    pairs = []
    for row in frame.itertuples(index=False):
        more, less = str(row.sent_more).split(), str(row.sent_less).split()
        k = 0
        while k < min(len(more), len(less)) - 1 and more[k] == less[k]:
            k += 1
        prefix = " ".join(more[:k])
        pairs.append(
            {
                "prompt": lead + prefix,
                "chosen": (" " if k else "") + " ".join(less[k:]),
                "rejected": (" " if k else "") + " ".join(more[k:]),
                "shared_words": k,
                "sent_more": str(row.sent_more),
                "sent_less": str(row.sent_less),
                "bias_type": str(row.bias_type),
            }
        )
    return [p for p in pairs if p["chosen"] != p["rejected"]]


def read_preferences(path: str) -> list[dict]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data.path: file '{path}' not found; preference data is JSONL with prompt, chosen, rejected")
    pairs = []
    for n, row in read_jsonl(p):
        missing = [k for k in FIELDS if not isinstance(row.get(k), str)]
        if missing:
            raise DataError(
                f"{path} line {n}: no text field(s) {', '.join(missing)}; each line needs "
                "prompt, chosen and rejected strings"
            )
        pairs.append(row)
    if len(pairs) < 4:
        raise DataError(f"{path}: {len(pairs)} preference pairs; need at least 4 to train and hold some out")
    return pairs


def load_preferences(cfg: DataConfig, lead: str) -> dict[str, list[dict]]:
    """train / validation / test lists of pairs."""
    if cfg.name is not None:
        if cfg.name != "crows-pairs":
            raise DataError(
                f"data.name: '{cfg.name}' has no preference pairs; use crows-pairs or a JSONL data.path "
                "with prompt, chosen, rejected"
            )
        pairs = crows_preferences(lead)
    else:
        pairs = read_preferences(cfg.path)
    order = list(range(len(pairs)))
    random.Random(cfg.split.seed).shuffle(order)
    n_test, n_val = round(cfg.split.test * len(pairs)), round(cfg.split.validation * len(pairs))
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    out = {"train": [pairs[i] for i in train], "validation": [pairs[i] for i in val], "test": [pairs[i] for i in test]}
    if cfg.max_train_samples:
        out["train"] = out["train"][: cfg.max_train_samples]
    if cfg.max_eval_samples:
        out["validation"], out["test"] = out["validation"][: cfg.max_eval_samples], out["test"][: cfg.max_eval_samples]
    if not out["train"] or not out["test"]:
        raise DataError("data.split leaves no training or no held-out pairs; set data.split.test between 0.05 and 0.5")
    return out


def check_source(recipe) -> None:
    """Cheap checks for `keel validate` on sft / align recipes: the data source exists and fits."""
    cfg = recipe.data
    if cfg.name is not None and (recipe.sft is not None or cfg.name != "crows-pairs"):
        what = "a chat JSONL data.path" if recipe.sft is not None else "crows-pairs or a JSONL data.path"
        raise DataError(f"data.name: '{cfg.name}' cannot feed this recipe; use {what}")
    if cfg.path is None:
        return
    if not Path(cfg.path).expanduser().is_file():
        raise DataError(
            f"data.path: file '{cfg.path}' not found; check the path (a relative data.path is relative "
            "to the recipe file's folder)"
        )
    if recipe.align is not None:  # the whole file, as the run reads it: line-numbered errors before any run dir
        read_preferences(cfg.path)
    else:
        from keel.data.chat import read_chat_jsonl

        read_chat_jsonl(cfg.path, use_chat=False)
