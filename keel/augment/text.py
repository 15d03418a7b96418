"""Label-preserving text augmentation of the training split (recipe ``data.augment``).

EDA's four token operations (Wei & Zou 2019: synonym replacement, random insertion, random swap, random
deletion), typo noise, counterfactual identity-term swaps (the fairness audit's lexicon, keel/trust/lexicon.py)
and, only when asked, paraphrases by a built-in causal LM. Applied after the splits are frozen, to the training
split only (validation and test stay as the person gave them), seeded: the same recipe gives the same copies.

Synonyms come from keel/augment/synonyms.json, a small table written for keel: no WordNet corpus ships inside an
offline Python package keel depends on (nltk downloads it at run time).
"""

from __future__ import annotations

import json
import logging
import random
import re
from functools import cache
from pathlib import Path

logger = logging.getLogger(__name__)

OPS = ("synonym", "insert", "swap", "delete", "typo", "identity", "paraphrase")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
_KEYBOARD = "qwertyuiop asdfghjkl zxcvbnm".split()


@cache
def synonyms() -> dict[str, tuple[str, ...]]:
    """word -> its synonyms (lower case); a word in two groups keeps the first."""
    doc = json.loads((Path(__file__).parent / "synonyms.json").read_text())
    table: dict[str, tuple[str, ...]] = {}
    for group in doc["groups"]:
        for w in group:
            table.setdefault(w, tuple(x for x in group if x != w))
    return table


def _same_case(src: str, word: str) -> str:
    if src.isupper() and len(src) > 1:
        return word.upper()
    return word[:1].upper() + word[1:] if src[:1].isupper() else word


def _n_changes(words: list, alpha: float) -> int:
    return max(1, round(alpha * len(words)))


def synonym_replace(text: str, rng: random.Random, alpha: float) -> str:
    """Replace up to alpha * words words that have a synonym in the table by one of them."""
    table = synonyms()
    spots = [m for m in _WORD.finditer(text) if m.group(0).lower() in table]
    if not spots:
        return text
    rng.shuffle(spots)
    chosen = sorted(spots[: _n_changes(text.split(), alpha)], key=lambda m: m.start())
    out, last = [], 0
    for m in chosen:
        out += [text[last : m.start()], _same_case(m.group(0), rng.choice(table[m.group(0).lower()]))]
        last = m.end()
    return "".join(out) + text[last:]


def random_insert(text: str, rng: random.Random, alpha: float) -> str:
    """Insert a synonym of a word of the text at a random place, alpha * words times."""
    words = text.split()
    table = synonyms()
    have = [w for w in words if _bare(w) in table]
    if not have:
        return text
    for _ in range(_n_changes(words, alpha)):
        words.insert(rng.randint(0, len(words)), rng.choice(table[_bare(rng.choice(have))]))
    return " ".join(words)


def random_swap(text: str, rng: random.Random, alpha: float) -> str:
    """Swap two random words, alpha * words times."""
    words = text.split()
    if len(words) < 2:
        return text
    for _ in range(_n_changes(words, alpha)):
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return " ".join(words)


def random_delete(text: str, rng: random.Random, alpha: float) -> str:
    """Drop each word with probability alpha; at least one word stays."""
    words = text.split()
    if len(words) < 2:
        return text
    kept = [w for w in words if rng.random() >= alpha]
    return " ".join(kept) if kept else rng.choice(words)


def typo_noise(text: str, rng: random.Random, rate: float) -> str:
    """Each letter, with probability ``rate``: dropped, doubled, swapped with the next, or hit as a keyboard neighbour."""
    chars, out, i = list(text), [], 0
    while i < len(chars):
        c = chars[i]
        if not c.isalpha() or rng.random() >= rate:
            out.append(c)
            i += 1
            continue
        kind = rng.randrange(4)
        if kind == 0:  # dropped
            pass
        elif kind == 1:
            out += [c, c]
        elif kind == 2 and i + 1 < len(chars):
            out += [chars[i + 1], c]
            i += 1
        else:
            out.append(_same_case(c, _neighbour(c.lower(), rng)))
        i += 1
    return "".join(out) or text


def _neighbour(c: str, rng: random.Random) -> str:
    for row in _KEYBOARD:
        k = row.find(c)
        if k >= 0:
            return row[max(0, k - 1)] if (k == len(row) - 1 or (k > 0 and rng.random() < 0.5)) else row[k + 1]
    return c


def _bare(word: str) -> str:
    return word.strip(".,!?;:\"'()").lower()


def identity_swap(text: str, categories: list[str]) -> str | None:
    """The counterfactual text (keel/trust/lexicon.py), or None when it names no swappable term or is ambiguous."""
    from keel.trust import lexicon

    swap = lexicon.swap_terms(text, categories)
    return swap.text if swap.n else None


def augment_texts(
    texts: list[str], cfg, categories: list[str] | None = None
) -> tuple[list[tuple[int, str, str]], dict]:
    """The copies for ``cfg`` (a recipe's data.augment) as (source index, new text, operation), and counts per operation.

    Each copy takes one operation picked at random among ``cfg.ops`` (EDA's scheme); the identity swap is the
    exception: it is deterministic, so each text that names a swappable term gets exactly one swapped copy.
    A copy equal to its source or to another copy of it (nothing left to change) is not added.
    """
    rng = random.Random(cfg.seed)
    token_ops = [op for op in cfg.ops if op not in ("identity", "paraphrase")]
    fns = {
        "synonym": lambda t: synonym_replace(t, rng, cfg.alpha),
        "insert": lambda t: random_insert(t, rng, cfg.alpha),
        "swap": lambda t: random_swap(t, rng, cfg.alpha),
        "delete": lambda t: random_delete(t, rng, cfg.alpha),
        "typo": lambda t: typo_noise(t, rng, cfg.typo_rate),
    }
    if "identity" in cfg.ops and categories is None:
        from keel.trust import lexicon

        categories = lexicon.categories(None)
    copies: list[tuple[int, str, str]] = []
    for i, text in enumerate(texts):
        seen = {text}
        for _ in range(cfg.copies if token_ops else 0):
            op = rng.choice(token_ops)
            new = fns[op](text)
            if new not in seen:
                seen.add(new)
                copies.append((i, new, op))
        if "identity" in cfg.ops:
            new = identity_swap(text, categories)
            if new is not None and new not in seen:
                copies.append((i, new, "identity"))
    if "paraphrase" in cfg.ops and texts:
        from keel.augment.paraphrase import paraphrase

        picked = sorted(rng.sample(range(len(texts)), min(cfg.max_paraphrases, len(texts))))
        for i, new in zip(picked, paraphrase([texts[i] for i in picked], cfg.paraphrase_model, cfg.seed)):
            if new and new != texts[i]:
                copies.append((i, new, "paraphrase"))
    counts = {op: sum(1 for c in copies if c[2] == op) for op in cfg.ops}
    return copies, counts


def augment_train(train_ds, tokenizer, recipe, run_dir: Path | None = None):
    """The tokenized training split with the augmented copies appended (the splits on disk stay as they were);
    what was added is written to RUN/data/augment.json for the report."""

    cfg = recipe.data.augment
    texts = list(train_ds["text"])
    cats = None
    if recipe.audit is not None and recipe.audit.fairness is not None:
        cats = recipe.audit.fairness.categories
    copies, counts = augment_texts(texts, cfg, cats)
    summary = {
        "train_before": len(texts),
        "added": len(copies),
        "per_op": counts,
        "config": cfg.model_dump(mode="json"),
        "examples": [{"op": op, "source": texts[i], "copy": t} for i, t, op in _spread(copies)],
    }
    if run_dir is not None:
        from keel.io import atomic_write_json
        from keel.progress import is_main_process

        if is_main_process():
            (Path(run_dir) / "data").mkdir(parents=True, exist_ok=True)
            atomic_write_json(Path(run_dir) / "data" / "augment.json", summary)
    per_op = ", ".join(f"{op} {n}" for op, n in counts.items())
    logger.info(f"data.augment: {len(copies)} copies added to {len(texts)} training texts ({per_op})")
    if not copies:
        return train_ds
    from keel.data.prepare import append_rows

    labels = list(train_ds["label"])
    groups = list(train_ds["group"]) if "group" in train_ds.column_names else None
    return append_rows(
        train_ds,
        [t for _, t, _ in copies],
        [labels[i] for i, _, _ in copies],
        [groups[i] for i, _, _ in copies] if groups is not None else None,
        tokenizer,
        recipe,
    )


def _spread(copies: list, per_op: int = 2) -> list:
    """A few copies of each operation, for the report."""
    out, seen = [], {}
    for c in copies:
        if seen.get(c[2], 0) < per_op:
            seen[c[2]] = seen.get(c[2], 0) + 1
            out.append(c)
    return out
