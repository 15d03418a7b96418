"""Client-level differential privacy for federated rounds, accounted with Opacus (the accountant keel uses).

Central mode (DP-FedAvg, McMahan et al. 2018): each sampled site clips its update to norm C, the server adds
Gaussian noise of std z * C / m to the mean of m updates. One round is one step of the subsampled Gaussian
mechanism with rate q = m / sites, so the epsilon after R rounds is Opacus's RDP figure for (z, q, R).
(Flower samples a fixed number of sites per round; the RDP analysis assumes Poisson sampling, the usual
approximation.) Local mode: each site adds its own noise per round, (eps / R, delta / R) each, so the whole
run stays within (eps, delta) by basic composition.
"""

from __future__ import annotations

from keel.errors import KeelError


def default_delta(sites: int) -> float:
    return 1.0 / (10 * sites)


def noise_for_budget(epsilon: float, delta: float, sample_rate: float, rounds: int) -> float:
    """The noise multiplier that spends ``epsilon`` in ``rounds`` rounds."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=rounds, accountant="rdp"))


def epsilon_spent(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """Epsilon after ``rounds`` rounds (0 rounds: 0). Infinite without noise."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(noise_multiplier, sample_rate, rounds)]
    return float(acc.get_epsilon(delta))


def plan(cfg, sites_per_round: int) -> dict | None:
    """What the recipe's ``federated.dp`` means for this run: noise, delta, the budget. None when DP is off."""
    dp = cfg.dp
    if dp.mode == "none":
        return None
    delta = dp.delta if dp.delta is not None else default_delta(cfg.sites)
    if delta >= 1.0 / cfg.sites:
        raise KeelError(f"federated.dp.delta={delta:g} is not below 1/sites={1 / cfg.sites:g}; a delta that large "
                        f"allows naming a site outright: lower it (default 1/(10*sites))")
    q = min(1.0, sites_per_round / cfg.sites)
    if dp.mode == "local":
        return {"mode": "local", "epsilon_budget": dp.epsilon, "delta": delta, "clipping_norm": dp.clipping_norm,
                "round_epsilon": dp.epsilon / cfg.rounds, "round_delta": delta / cfg.rounds, "sample_rate": q}
    z = dp.noise_multiplier if dp.noise_multiplier is not None else noise_for_budget(dp.epsilon, delta, q, cfg.rounds)
    return {"mode": "central", "epsilon_budget": dp.epsilon, "delta": delta, "clipping_norm": dp.clipping_norm,
            "noise_multiplier": z, "sample_rate": q, "sites_per_round": sites_per_round}


def spent(p: dict, rounds_done: int) -> float:
    if p["mode"] == "local":
        return p["round_epsilon"] * rounds_done
    return epsilon_spent(p["noise_multiplier"], p["sample_rate"], rounds_done, p["delta"])


def round_allowed(p: dict | None, rounds_done: int) -> bool:
    """Whether one more round stays within the budget (always, without a budget)."""
    if p is None or p.get("epsilon_budget") is None:
        return True
    return spent(p, rounds_done + 1) <= p["epsilon_budget"] * (1 + 1e-6)
