"""keel's identity-term lexicon: which groups a text mentions, and its counterfactual (terms swapped)."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from keel.errors import RecipeError

LEXICON_FILE = Path(__file__).with_name("lexicon.json")


@lru_cache(maxsize=1)
def load_lexicon() -> dict:
    doc = json.loads(LEXICON_FILE.read_text(encoding="utf-8"))
    for category, pairs in doc["swaps"].items():
        seen: set[str] = set()
        for a, b in pairs:
            if a in seen or b in seen or a == b:
                raise ValueError(f"lexicon: '{a}'/'{b}' in category {category} is in two swap pairs")
            seen.update((a, b))
    return doc


def categories(selected: list[str] | None = None) -> list[str]:
    known = list(load_lexicon()["categories"])
    if selected is None:
        return known
    unknown = [c for c in selected if c not in known]
    if unknown:
        raise RecipeError(f"audit.fairness.categories: unknown {unknown}; known categories: {', '.join(known)}")
    return list(selected)


def _words(terms) -> re.Pattern:
    alts = sorted(set(terms), key=len, reverse=True)  # longest first, so 'african-american' beats 'african'
    return re.compile(r"(?<![\w-])(" + "|".join(re.escape(t) for t in alts) + r")(?![\w-])", re.IGNORECASE)


@lru_cache(maxsize=None)
def _group_patterns(category: str) -> dict[str, re.Pattern]:
    return {g: _words(terms) for g, terms in load_lexicon()["categories"][category].items()}


def groups_in(text: str, category: str) -> list[str]:
    """Subgroups of ``category`` that ``text`` mentions (possibly several)."""
    return [g for g, pat in _group_patterns(category).items() if pat.search(text)]


def group_label(text: str, category: str) -> str:
    """One label per text for per-group tables: the subgroup, 'none', or 'several'."""
    found = groups_in(text, category)
    return found[0] if len(found) == 1 else ("none" if not found else "several")


@lru_cache(maxsize=None)
def _swap_table(cats: tuple[str, ...]) -> tuple[dict[str, str], re.Pattern]:
    table: dict[str, str] = {}
    for c in cats:
        for a, b in load_lexicon()["swaps"][c]:
            table[a], table[b] = b, a
    return table, _words(table)


def _same_case(src: str, word: str) -> str:
    if src.isupper() and len(src) > 1:
        return word.upper()
    if src[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def swap_terms(text: str, cats: list[str] | tuple[str, ...]) -> tuple[str, int]:
    """The counterfactual text (every swappable identity term replaced by its pair) and the number swapped.

    The swap is an involution: ``swap_terms(swap_terms(t)[0])[0] == t`` for lower-, title- and upper-case terms.
    """
    table, pattern = _swap_table(tuple(cats))
    count = 0

    def repl(m: re.Match) -> str:
        nonlocal count
        count += 1
        return _same_case(m.group(0), table[m.group(0).lower()])

    return pattern.sub(repl, text), count
