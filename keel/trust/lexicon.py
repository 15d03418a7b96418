"""keel's identity-term lexicon: which groups a text mentions, and its counterfactual (terms swapped)."""

from __future__ import annotations

import json
import re
from functools import cache, lru_cache
from pathlib import Path
from typing import NamedTuple

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


def check_audit_recipe(recipe) -> None:
    """The audit section's references, checked before training: lexicon categories, the group column, baseline_run."""
    f = recipe.audit.fairness
    if f is None:
        return
    if f.groups == "lexicon":
        categories(f.categories)
    else:
        from keel.data.load import column_mapping

        if "group" not in column_mapping(recipe.data, recipe.task):
            raise RecipeError(
                "audit.fairness.groups is 'column' but the data has no group column; set "
                "data.columns.group to a column of the data, or use audit.fairness.groups=lexicon"
            )
    if f.baseline_run and not (Path(f.baseline_run) / "audit" / "fairness.json").is_file():
        raise RecipeError(
            f"audit.fairness.baseline_run: {Path(f.baseline_run) / 'audit' / 'fairness.json'} not found; "
            f"run `keel audit {f.baseline_run}` first"
        )


def _words(terms) -> re.Pattern:
    alts = sorted(set(terms), key=len, reverse=True)  # longest first, so 'african-american' beats 'african'
    return re.compile(r"(?<![\w-])(" + "|".join(re.escape(t) for t in alts) + r")(?![\w-])", re.IGNORECASE)


@cache
def _group_patterns(category: str) -> dict[str, re.Pattern]:
    return {g: _words(terms) for g, terms in load_lexicon()["categories"][category].items()}


def groups_in(text: str, category: str) -> list[str]:
    """Subgroups of ``category`` that ``text`` mentions (possibly several)."""
    return [g for g, pat in _group_patterns(category).items() if pat.search(text)]


def group_label(text: str, category: str) -> str:
    """One label per text for per-group tables: the subgroup, 'none', or 'several'."""
    found = groups_in(text, category)
    return found[0] if len(found) == 1 else ("none" if not found else "several")


# The gender pronouns are not a one-to-one swap: "her" is both "his" (determiner: her mother -> his father) and
# "him" (object: told her. -> told him.), "his" both "her" (his car) and "hers" (the car is his). They are swapped
# by their role, read off the next word; where the role cannot be told, the text is skipped and counted.
PRONOUNS = ("her", "his", "him", "hers")
# Words that cannot follow a determiner: after "her" they mean an object, after "his" a standalone pronoun.
NOT_AFTER_DETERMINER = frozenset(
    """
a an the this that these those to in on at for from with without about into onto of by as like than over under
after before through during since until around off up down out away back behind near and or but nor so because
if when while where although though unless whether i you he she it we they me him her us them my your our their
its his hers some any all what who whom which how why something anything everything nothing is was are were be
been am will would can could should shall may might must do does did has have had not very too again now then
here there today yesterday tonight tomorrow once twice anyway already yet still also just really always never
ever alone enough please
""".split()
)
# After these verbs "her <word>" may be an object followed by a second object or a complement ("gave her flowers",
# "made her happy", "saw her leave") as well as a determiner ("gave her book away"): ambiguous.
OBJECT_VERBS = frozenset(
    """
give gives gave given giving tell tells told telling show shows showed shown send sends sent ask asks asked
make makes made making let lets letting help helps helped see sees saw seen watch watched hear hears heard
call calls called keep keeps kept want wants wanted get gets got find finds found leave leaves left teach taught
bring brings brought buy buys bought offer offered pay paid owe owed wish wished lend lent promise promised
remind reminded allow allowed force forced need needed expect expected wake woke drive drove
""".split()
)
_NEXT_WORD = re.compile(r"\s*([A-Za-z0-9][\w'-]*)")
_PREV_WORD = re.compile(r"([A-Za-z][\w'-]*)\s*$")


@cache
def _swap_table(cats: tuple[str, ...]) -> tuple[dict[str, str], re.Pattern]:
    table: dict[str, str] = {}
    for c in cats:
        for a, b in load_lexicon()["swaps"][c]:
            table[a], table[b] = b, a
    return table, _words([*table, *(PRONOUNS if "gender" in cats else ())])


def _same_case(src: str, word: str) -> str:
    if src.isupper() and len(src) > 1:
        return word.upper()
    if src[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _pronoun(word: str, text: str, start: int, end: int, table: dict[str, str]) -> str | None:
    """The counterpart of a gender pronoun at text[start:end] by its role; None when the role is ambiguous."""
    if word == "him":
        return "her"
    if word == "hers":
        return "his"
    nxt = _NEXT_WORD.match(text, end)
    follower = nxt.group(1).lower() if nxt else None  # None: the text ends or punctuation follows
    determiner = follower is not None and follower not in NOT_AFTER_DETERMINER
    if word == "his":
        return "her" if determiner else "hers"
    if not determiner:
        return "him"
    prev = _PREV_WORD.search(text, 0, start)
    if follower in table or follower == "own" or not (prev and prev.group(1).lower() in OBJECT_VERBS):
        return "his"
    return None


class Swap(NamedTuple):
    """A counterfactual: the swapped text (None when a pronoun's role is ambiguous), terms swapped, ambiguous words."""

    text: str | None
    n: int
    ambiguous: tuple[str, ...] = ()


def swap_terms(text: str, cats: list[str] | tuple[str, ...]) -> Swap:
    """The counterfactual text (every swappable identity term replaced by its counterpart) and the number swapped.

    Pairs swap both ways, so ``swap_terms(swap_terms(t).text).text == t`` for them in lower, title and upper case;
    her/his/him/hers swap by their role (her mother -> his father, told her. -> told him., the car is his. -> the
    car is hers.). A text with a pronoun whose role cannot be told ("gave her flowers") gets no counterfactual:
    ``text`` is None, ``n`` 0, and ``ambiguous`` names the words, so callers skip it and count it.
    """
    table, pattern = _swap_table(tuple(cats))
    count, ambiguous = 0, []

    def repl(m: re.Match) -> str:
        nonlocal count
        word = m.group(0).lower()
        other = _pronoun(word, m.string, m.start(), m.end(), table) if word in PRONOUNS else table[word]
        if other is None:
            ambiguous.append(m.group(0))
            return m.group(0)
        count += 1
        return _same_case(m.group(0), other)

    swapped = pattern.sub(repl, text)
    if ambiguous:
        return Swap(None, 0, tuple(ambiguous))
    return Swap(swapped, count)
