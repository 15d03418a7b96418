"""Curation on the built-in tweets: near-dedup precision/recall on planted near-duplicates, and PII found per type.

Dedup: the first --n tweets of keel's training split, made free of near-duplicates first (keel's own near-dedup),
then --planted near-copies of random ones are inserted at random places. A copy is one of: case and punctuation
changed, a word dropped, a word replaced, a retweet prefix ("RT @user: "), a URL appended. Recall: planted pairs of
which near-dedup dropped one member; precision: dropped rows that belong to a planted pair; "recall J>=t": recall
among the planted pairs whose exact Jaccard reaches the threshold (what LSH can miss). Swept over thresholds.

PII: every row of the data set (after the source's exact dedup), scrubbed with keel's Presidio recognizers;
replacements per type. Writes benchmarks/results/curate-tweets.json.

    .venv/bin/python benchmarks/curate_tweets.py [--n 5000] [--planted 500] [--pii-rows 0 (all; -1: none, keep the last PII figures)]
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _arg(argv, name, default):
    return type(default)(argv[argv.index(name) + 1]) if name in argv else default


def _copy(text: str, rng: random.Random) -> tuple[str, str]:
    words = text.split()
    kind = rng.choice(["case", "drop", "replace", "retweet", "url"])
    if kind == "case":
        return kind, text.upper().replace(".", "!").replace(",", "")
    if kind == "drop" and len(words) > 4:
        del words[rng.randrange(len(words))]
        return kind, " ".join(words)
    if kind == "replace" and len(words) > 4:
        words[rng.randrange(len(words))] = rng.choice(["really", "so", "very", "lol"])
        return kind, " ".join(words)
    if kind == "retweet":
        return kind, f"RT @user{rng.randrange(999)}: {text}"
    return "url", f"{text} http://t.co/{rng.randrange(10**6)}"


def dedup_pr(texts: list[str], planted: int, thresholds, shingle: int, num_perm: int) -> list[dict]:
    from keel.data.curate.dedup import near_duplicates

    base_found = near_duplicates(texts, 0.5, shingle, num_perm, 1)  # a base with no near-duplicates at all
    dropped = set(base_found.drop)
    base = [t for i, t in enumerate(texts) if i not in dropped and len(t.split()) >= 5]
    rng = random.Random(0)
    rows = [(t, i, None) for i, t in enumerate(base)]  # (text, pair id, copy kind)
    for _ in range(planted):
        src = rng.randrange(len(base))
        kind, text = _copy(base[src], rng)
        rows.insert(rng.randrange(len(rows) + 1), (text, src, kind))
    pair = [p for _, p, _ in rows]
    copied = {p for _, p, k in rows if k is not None}
    from keel.data.curate.dedup import _jaccard, _shingles

    true_sim = {}  # planted pair -> exact Jaccard of the copy with its source (the lowest, if copied twice)
    for text, p, k in rows:
        if k is not None:
            sim = _jaccard(_shingles(text, shingle), _shingles(base[p], shingle))
            true_sim[p] = min(sim, true_sim.get(p, 1.0))
    out = []
    for threshold in thresholds:
        start = time.perf_counter()
        found = near_duplicates([t for t, _, _ in rows], threshold, shingle, num_perm, 1)
        seconds = time.perf_counter() - start
        hits = {pair[i] for i in found.drop if pair[i] in copied}
        true_pos = sum(1 for i in found.drop if pair[i] in copied)
        by_kind = {}
        for kind in ("case", "drop", "replace", "retweet", "url"):
            ids = {p for _, p, k in rows if k == kind}
            by_kind[kind] = round(len(ids & hits) / max(len(ids), 1), 3)
        reachable = {p for p, sim in true_sim.items() if sim >= threshold}
        out.append(
            {
                "threshold": threshold,
                "pairs_at_or_above_threshold": len(reachable),
                "recall_of_those": len(reachable & hits) / max(len(reachable), 1),
                "rows": len(rows),
                "planted_pairs": len(copied),
                "dropped": len(found.drop),
                "recall": len(hits) / len(copied),
                "precision": true_pos / max(len(found.drop), 1),
                "recall_by_copy_kind": by_kind,
                "seconds": round(seconds, 2),
            }
        )
    return out


def lsh_precision(texts: list[str], thresholds, shingle: int, num_perm: int) -> list[dict]:
    """On the tweets as they are: the share of near-dedup's drops whose exact Jaccard similarity (of the same
    shingles) with the row they were matched to reaches the threshold, i.e. how often MinHash LSH is wrong."""
    from keel.data.curate.dedup import _shingles, near_duplicates

    out = []
    for threshold in thresholds:
        found = near_duplicates(texts, threshold, shingle, num_perm, 1)
        exact = []
        for i in found.drop:
            a, b = _shingles(texts[i], shingle), _shingles(texts[found.of[i]], shingle)
            exact.append(len(a & b) / len(a | b))
        ok = sum(1 for j in exact if j >= threshold)
        out.append(
            {
                "threshold": threshold,
                "rows": len(texts),
                "dropped": len(found.drop),
                "exact_jaccard_precision": ok / max(len(exact), 1),
            }
        )
    return out


def main(argv: list[str]) -> dict:
    RESULTS.mkdir(exist_ok=True)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    from keel.data.curate.pii import scrub
    from keel.data.load import load_splits
    from keel.recipe import DataConfig
    from keel.recipe.curate import DedupConfig, PiiConfig

    n, planted, pii_rows = _arg(argv, "--n", 5000), _arg(argv, "--planted", 500), _arg(argv, "--pii-rows", 0)
    raw = load_splits(DataConfig(name="tweets-sentiment"), "classification")
    d = DedupConfig()
    dedup = dedup_pr(raw.train["text"].tolist()[:n], planted, (0.6, 0.7, 0.8, 0.9), d.shingle, d.num_perm)
    print(
        f"{'threshold':>9} {'rows':>6} {'dropped':>8} {'recall':>7} {'precision':>9} {'recall J>=t':>12}  by copy kind"
    )
    for r in dedup:
        print(
            f"{r['threshold']:>9} {r['rows']:>6} {r['dropped']:>8} {r['recall']:>7.3f} {r['precision']:>9.3f} "
            f"{r['recall_of_those']:>12.3f}  {r['recall_by_copy_kind']}"
        )

    natural = lsh_precision(raw.train["text"].tolist()[:n], (0.6, 0.7, 0.8, 0.9), d.shingle, d.num_perm)
    for r in natural:
        print(
            f"threshold {r['threshold']}: {r['dropped']} near-duplicates among {r['rows']} tweets as they are; "
            f"{r['exact_jaccard_precision']:.3f} of them reach the threshold by exact Jaccard"
        )
    result_file = RESULTS / "curate-tweets.json"
    if pii_rows < 0:  # dedup only: keep the PII figures of the last full run
        previous = json.loads(result_file.read_text()) if result_file.is_file() else {}
        result = {
            "dedup": {"shingle": d.shingle, "num_perm": d.num_perm, "sweep": dedup, "natural": natural},
            "pii": previous.get("pii"),
        }
        result_file.write_text(json.dumps(result, indent=2) + "\n")
        return result
    texts = [t for s in ("train", "validation", "test") for t in getattr(raw, s)["text"].tolist()]
    texts = texts[:pii_rows] if pii_rows else texts
    start = time.perf_counter()
    _, counts, changed = scrub(texts, PiiConfig())
    pii = {
        "rows": len(texts),
        "rows_changed": len(changed),
        "counts": counts,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(
        f"PII in {len(texts):,} tweets ({len(changed):,} changed, {pii['seconds']} s): "
        + ", ".join(f"{k} {v:,}" for k, v in counts.items())
    )
    result = {"dedup": {"shingle": d.shingle, "num_perm": d.num_perm, "sweep": dedup, "natural": natural}, "pii": pii}
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
