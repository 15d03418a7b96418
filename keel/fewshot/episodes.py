"""Episodes for few-shot learning: N classes, K support and Q query rows each, with no row on both sides."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from keel.errors import KeelError


@dataclass(frozen=True)
class Episode:
    """One N-way K-shot task: ``classes[j]``'s rows are ``support[j]`` (K) and ``query[j]`` (Q), row indices."""

    classes: tuple[int, ...]
    support: tuple[tuple[int, ...], ...]
    query: tuple[tuple[int, ...], ...]

    def support_rows(self) -> list[tuple[int, int]]:
        """(row, episode class 0..N-1) for every support row."""
        return [(row, j) for j, rows in enumerate(self.support) for row in rows]

    def query_rows(self) -> list[tuple[int, int]]:
        return [(row, j) for j, rows in enumerate(self.query) for row in rows]


class EpisodeSampler:
    """Draws episodes over labelled rows: per episode, ``n_way`` classes, then ``k_shot + n_query`` distinct rows of
    each, split into support and query. Rows are drawn once per episode, without replacement, so a query row is
    never in that episode's support set. Rows must be distinct texts (dedupe first: a text repeated under two row
    numbers would be on both sides).

    Only classes with at least ``k_shot + n_query`` rows take part; fewer than ``n_way`` such classes is an error.
    """

    def __init__(self, labels: Sequence[int], n_way: int, k_shot: int, n_query: int, seed: int = 0):
        if n_way < 2 or k_shot < 1 or n_query < 1:
            raise KeelError(f"an episode needs n_way >= 2, k_shot >= 1, n_query >= 1; got {n_way}, {k_shot}, {n_query}")
        self.n_way, self.k_shot, self.n_query = n_way, k_shot, n_query
        by_class: dict[int, list[int]] = {}
        for row, label in enumerate(labels):
            by_class.setdefault(int(label), []).append(row)
        need = k_shot + n_query
        self.rows = {c: rows for c, rows in sorted(by_class.items()) if len(rows) >= need}
        if len(self.rows) < n_way:
            raise KeelError(
                f"{n_way}-way {k_shot}-shot episodes with {n_query} queries need {n_way} classes of at least {need} "
                f"rows; {len(self.rows)} of the {len(by_class)} classes have that many; lower n_way, k_shot or n_query"
            )
        self.rng = random.Random(seed)

    def sample(self) -> Episode:
        classes = tuple(self.rng.sample(sorted(self.rows), self.n_way))
        support, query = [], []
        for c in classes:
            drawn = self.rng.sample(self.rows[c], self.k_shot + self.n_query)  # distinct rows
            support.append(tuple(drawn[: self.k_shot]))
            query.append(tuple(drawn[self.k_shot :]))
        return Episode(classes, tuple(support), tuple(query))

    def episodes(self, n: int) -> Iterator[Episode]:
        for _ in range(n):
            yield self.sample()
