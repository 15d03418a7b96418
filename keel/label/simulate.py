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
    x_test: np.ndarray,
    y_test: np.ndarray,
    strategy: str,
    n_labels: int,
    start: int,
    batch: int,
    budget: int,
    seed: int,
) -> list[dict]:
    """[{labels, accuracy}] after the random start set and after each batch the strategy picks, up to ``budget``."""
    rng = np.random.default_rng(seed)
    labelled = [int(i) for i in rng.choice(len(x_pool), size=start, replace=False)]
    curve = []
    while True:
        probe = Probe(n_labels, seed).fit(x_pool[labelled], y_pool[labelled])
        curve.append({"labels": len(labelled), "accuracy": probe.accuracy(x_test, y_test)})
        if len(labelled) >= budget:
            return curve
        taken = set(labelled)
        open_rows = np.array([i for i in range(len(x_pool)) if i not in taken])
        k = min(batch, budget - len(labelled))
        local = select(probe.predict_proba(x_pool[open_rows]), k, strategy, rng, x_pool[open_rows])
        labelled += [int(open_rows[i]) for i in local]
