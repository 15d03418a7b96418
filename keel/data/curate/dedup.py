"""Exact and near-duplicate detection: normalised text, MinHash LSH (datasketch), cross-split contamination.

Near duplicates are pairs whose Jaccard similarity of character shingles (of the normalised text) is at least the
threshold. LSH proposes candidates from banded MinHash signatures; each candidate is confirmed by its exact
Jaccard similarity (computed for candidates only), so no pair below the threshold is dropped. A pair the bands
miss is missed: recall depends on the threshold and num_perm (benchmarks/curate_tweets.py measures it).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalise(text: str) -> str:
    """NFKC, case-folded, punctuation and runs of spaces collapsed to one space: the text exact dedup compares."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


@dataclass
class Duplicates:
    """Rows to drop (positions in the input) and, for each, the row it duplicates and their estimated similarity."""

    drop: list[int] = field(default_factory=list)
    of: dict[int, int] = field(default_factory=dict)
    similarity: dict[int, float] = field(default_factory=dict)


def exact_duplicates(texts: list[str]) -> Duplicates:
    """Rows whose normalised text equals an earlier row's (the first one is kept)."""
    seen: dict[str, int] = {}
    out = Duplicates()
    for i, text in enumerate(texts):
        key = normalise(text)
        if key in seen:
            out.drop.append(i)
            out.of[i] = seen[key]
            out.similarity[i] = 1.0
        else:
            seen[key] = i
    return out


def _shingles(text: str, k: int) -> set[bytes]:
    norm = normalise(text)
    if len(norm) <= k:
        return {norm.encode()}
    return {norm[i : i + k].encode() for i in range(len(norm) - k + 1)}


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / max(len(a | b), 1)


def minhashes(texts: list[str], shingle: int, num_perm: int, seed: int) -> list:
    from datasketch import MinHash

    return MinHash.bulk((_shingles(t, shingle) for t in texts), num_perm=num_perm, seed=seed)


def _lsh(threshold: float, num_perm: int):
    from datasketch import MinHashLSH

    # candidates are confirmed by their exact similarity, so the bands are tuned to miss few pairs (false negatives
    # weigh 4x false positives in datasketch's choice of bands and rows)
    return MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.2, 0.8))


def near_duplicates(texts: list[str], threshold: float, shingle: int, num_perm: int, seed: int) -> Duplicates:
    """Rows that are near-duplicates of an earlier kept row, in order (the first of each cluster is kept)."""
    hashes = minhashes(texts, shingle, num_perm, seed)
    lsh = _lsh(threshold, num_perm)
    out = Duplicates()
    for i, mh in enumerate(hashes):
        best, best_sim = None, 0.0
        candidates = lsh.query(mh)
        mine = _shingles(texts[i], shingle) if candidates else None
        for j in candidates:
            sim = _jaccard(mine, _shingles(texts[j], shingle))
            if sim >= threshold and (sim > best_sim or (sim == best_sim and j < best)):
                best, best_sim = j, sim
        if best is None:
            lsh.insert(i, mh)
        else:
            out.drop.append(i)
            out.of[i] = best
            out.similarity[i] = best_sim
    return out


def contaminated(
    train: list[str], others: list[str], threshold: float, shingle: int, num_perm: int, seed: int
) -> Duplicates:
    """Training rows that are near-duplicates (or exact ones, after normalising) of a row of ``others``
    (validation and test): ``of`` holds the position in ``others``. ``others`` is only read."""
    if not others or not train:
        return Duplicates()
    exact = {}
    for j, text in enumerate(others):
        exact.setdefault(normalise(text), j)
    other_hashes = minhashes(others, shingle, num_perm, seed)
    lsh = _lsh(threshold, num_perm)
    for j, mh in enumerate(other_hashes):
        lsh.insert(j, mh)
    out = Duplicates()
    for i, mh in enumerate(minhashes(train, shingle, num_perm, seed)):
        j = exact.get(normalise(train[i]))
        sim = 1.0
        if j is None:
            mine = _shingles(train[i], shingle)
            scored = [(_jaccard(mine, _shingles(others[c], shingle)), -c) for c in lsh.query(mh)]
            scored = [s for s in scored if s[0] >= threshold]
            if not scored:
                continue
            sim, neg = max(scored)
            j = -neg
        out.drop.append(i)
        out.of[i] = j
        out.similarity[i] = sim
    return out
