"""Heuristic quality filters (after Gopher's and C4's rules, sized for short texts): each rule is a function of one
text, and the counts per rule are reported. No language rule: keel has no offline language detector."""

from __future__ import annotations

import unicodedata

RULES = ("empty_or_garbled", "too_short", "too_long", "symbols", "repeated_ngrams")


def _garbled_share(text: str) -> float:
    bad = sum(1 for c in text if c == "\ufffd" or (unicodedata.category(c) == "Cc" and c not in "\t\n\r"))
    return bad / max(len(text), 1)


def failed_rules(text: str, cfg) -> list[str]:
    """The names of the rules of ``cfg`` (a QualityConfig) that ``text`` fails, in RULES order."""
    failed = []
    stripped = text.strip()
    words = stripped.split()
    if not stripped or not any(c.isalnum() for c in stripped) or _garbled_share(stripped) > cfg.max_garbled_ratio:
        failed.append("empty_or_garbled")
    if len(words) < cfg.min_words:
        failed.append("too_short")
    if cfg.max_chars is not None and len(text) > cfg.max_chars:
        failed.append("too_long")
    visible = [c for c in stripped if not c.isspace()]
    if visible and sum(1 for c in visible if not c.isalnum()) / len(visible) > cfg.max_symbol_ratio:
        failed.append("symbols")
    grams = [tuple(w.casefold() for w in words[i : i + cfg.ngram]) for i in range(len(words) - cfg.ngram + 1)]
    if len(grams) >= 2 and (len(grams) - len(set(grams))) / len(grams) > cfg.max_repeated_ngrams:
        failed.append("repeated_ngrams")
    return failed


def quality_filter(texts: list[str], cfg) -> tuple[list[int], dict[str, int], dict[int, list[str]]]:
    """(positions to drop, count of texts failing each rule, the rules each dropped text failed)."""
    counts = dict.fromkeys(RULES, 0)
    why: dict[int, list[str]] = {}
    for i, text in enumerate(texts):
        failed = failed_rules(text, cfg)
        for rule in failed:
            counts[rule] += 1
        if failed:
            why[i] = failed
    return sorted(why), counts, why
