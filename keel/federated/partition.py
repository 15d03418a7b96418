"""Cut a training split into simulated sites: IID, label skew (Dirichlet alpha) or one site per column value."""

from __future__ import annotations

import numpy as np

from keel.errors import DataError


def partition(
    labels, n_sites: int, kind: str = "iid", alpha: float = 0.5, seed: int = 0, groups=None
) -> list[list[int]]:
    """Row indices of each site. Deterministic in ``seed``; every site gets at least one row.

    ``labels``: the label id of every training row; ``groups``: the site column's value of every row (kind=column).
    """
    labels = np.asarray(labels)
    n = len(labels)
    rng = np.random.default_rng(seed)
    if kind == "column":
        if groups is None:
            raise DataError(
                "federated.partition.kind=column: the data has no site column; set federated.partition.column"
            )
        values = sorted({str(g) for g in groups})
        sites = [[i for i, g in enumerate(groups) if str(g) == v] for v in values]
        if len(sites) != n_sites:
            raise DataError(
                f"federated.partition.column has {len(values)} distinct values ({', '.join(values[:5])}"
                f"{', ...' if len(values) > 5 else ''}) but federated.sites is {n_sites}; set federated.sites={len(values)}"
            )
        return sites
    if n < n_sites:
        raise DataError(
            f"{n} training rows cannot make {n_sites} sites; lower federated.sites or raise data.max_train_samples"
        )
    if kind == "iid":
        order = rng.permutation(n)
        return [sorted(part.tolist()) for part in np.array_split(order, n_sites)]
    if kind != "dirichlet":
        raise DataError(f"federated.partition.kind must be iid, dirichlet or column; got {kind!r}")
    # Label skew (Hsu et al. 2019): each class is spread over the sites with proportions ~ Dirichlet(alpha).
    sites: list[list[int]] = [[] for _ in range(n_sites)]
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        share = rng.dirichlet(np.full(n_sites, alpha))
        cuts = (np.cumsum(share)[:-1] * len(rows)).astype(int)
        for site, part in enumerate(np.split(rows, cuts)):
            sites[site].extend(part.tolist())
    # A site that drew nothing takes one row from the largest site, so every site can train.
    for site in range(n_sites):
        if not sites[site]:
            donor = max(range(n_sites), key=lambda s: len(sites[s]))
            sites[site].append(sites[donor].pop())
    return [sorted(s) for s in sites]
