"""A simulated oracle: active learning on texts whose labels are known, to measure each strategy against random
sampling (accuracy on a held-out set against the number of labels given). The same strategies and probe as a
person's session (keel/label/strategies.py, probe.py)."""

from __future__ import annotations

import numpy as np

from keel.label.probe import Probe
from keel.label.strategies import select


def learning_curve(
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
) -> list[dict]:
    """[{labels, <eval name>: accuracy, ...}] after the start set (``cold_start``: random or typiclust, picked before
    any label is known) and after each batch the strategy picks, up to ``budget``. Every set in ``evals`` only
    scores the probe: nothing is chosen on it here."""
    rng = np.random.default_rng(seed)
    if cold_start == "random":
        labelled = [int(i) for i in rng.choice(len(x_pool), size=start, replace=False)]
    else:
        labelled = select(np.full((len(x_pool), n_labels), 1.0 / n_labels), start, cold_start, rng, x_pool)
    curve = []
    while True:
        probe = Probe(n_labels, seed, c).fit(x_pool[labelled], y_pool[labelled])
        point = {"labels": len(labelled)}
        point.update({name: probe.accuracy(x, y) for name, (x, y) in evals.items()})
        curve.append(point)
        if len(labelled) >= budget:
            return curve
        taken = np.zeros(len(x_pool), dtype=bool)
        taken[labelled] = True
        open_rows = np.flatnonzero(~taken)
        k = min(batch, budget - len(labelled))
        local = select(probe.predict_proba(x_pool[open_rows]), k, strategy, rng, x_pool[open_rows], x_pool[labelled])
        labelled += [int(open_rows[i]) for i in local]
