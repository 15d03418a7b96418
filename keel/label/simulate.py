"""A simulated oracle: active learning on texts whose labels are known, to measure each strategy against random
sampling (accuracy on a held-out set against the number of labels given). The same strategies and probe as a
person's session (keel/label/strategies.py, probe.py).

``simulate`` asks the questions and scores one held-out set (the validation split, where every choice is made);
``score_rounds`` refits the same probes on the same labels afterwards to read another set (the test split), so a
test set is read only once the choices are made.
"""

from __future__ import annotations

import numpy as np

from keel.label.probe import Probe
from keel.label.strategies import select


def _probe(x_pool, y_pool, labelled, n_labels, seed, c, semi) -> Probe:
    rest = np.ones(len(x_pool), dtype=bool)
    rest[labelled] = False
    return Probe(n_labels, seed, c, semi).fit(x_pool[labelled], y_pool[labelled], x_pool[rest])


def simulate(
    x_pool: np.ndarray,
    y_pool: np.ndarray,
    evals: dict[str, tuple[np.ndarray, np.ndarray]],
    strategy: str,
    n_labels: int,
    start: int,
    batch: int,
    budget: int,
    seed: int,
    cold_start: str = "random",
    c: float | str = 1.0,
    semi: str = "none",
) -> tuple[list[int], list[dict]]:
    """(pool rows in the order they were labelled, [{labels, <eval name>: accuracy, ...}] after the start set
    (``cold_start``: random, or a strategy that needs no label such as typiclust or probcover, picked before any
    label is known) and after each batch the strategy picks, up to ``budget``). Every set in ``evals`` only scores
    the probe: nothing is chosen on it here."""
    rng = np.random.default_rng(seed)
    if cold_start == "random":
        labelled = [int(i) for i in rng.choice(len(x_pool), size=start, replace=False)]
    else:
        labelled = select(np.full((len(x_pool), n_labels), 1.0 / n_labels), start, cold_start, rng, x_pool)
    curve = []
    while True:
        probe = _probe(x_pool, y_pool, labelled, n_labels, seed, c, semi)
        point = {"labels": len(labelled)}
        point.update({name: probe.accuracy(x, y) for name, (x, y) in evals.items()})
        curve.append(point)
        if len(labelled) >= budget:
            return labelled, curve
        taken = np.zeros(len(x_pool), dtype=bool)
        taken[labelled] = True
        open_rows = np.flatnonzero(~taken)
        k = min(batch, budget - len(labelled))
        local = select(probe.predict_proba(x_pool[open_rows]), k, strategy, rng, x_pool[open_rows], x_pool[labelled])
        labelled += [int(open_rows[i]) for i in local]


def score_rounds(
    x_pool: np.ndarray,
    y_pool: np.ndarray,
    order: list[int],
    counts: list[int],
    x: np.ndarray,
    y: np.ndarray,
    n_labels: int,
    seed: int,
    c: float | str = 1.0,
    semi: str = "none",
) -> list[float]:
    """Accuracy on (``x``, ``y``) of the probe fitted on the first ``n`` of ``order``, for each ``n`` in ``counts``
    (what ``simulate`` fitted, round by round)."""
    return [_probe(x_pool, y_pool, order[:n], n_labels, seed, c, semi).accuracy(x, y) for n in counts]
