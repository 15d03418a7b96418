"""Client-level differential privacy for federated rounds, accounted with Opacus's RDP accountant.

The unit of privacy is a whole site: the guarantee covers every global model the server releases (each round's
and the final one) and whatever is computed from them.

Central mode: DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models",
Algorithm 1 with the fixed-denominator estimator).
- Each round samples every site independently with probability q (Poisson sampling, done by keel's ``Guard``
  when q < 1), so the accountant's sampling assumption holds as stated.
- Each sampled site clips its update to L2 norm C; the server rejects an update over C (the site did not clip)
  and re-clips the rest exactly.
- The server releases ``w + (sum_i update_i + N(0, (z C)^2 I)) / m`` with ``m = q * sites`` fixed in advance.
  Adding or removing one site moves the sum by at most C whatever the other sites send, so one round is the
  sampled Gaussian mechanism (noise multiplier z, rate q); a site that drops out or whose update is rejected is
  a zero term of the sum, which changes neither the noise nor the accounting.
- A server optimiser (FedAdam) steps on the noised mean: post-processing. Krum and the trimmed mean are not a
  sum of bounded per-site terms (one site can decide the whole output), so keel refuses them with central DP.
- Epsilon after R released rounds: Opacus's RDP accountant for (z, q, R), converted at delta.

Local mode: each site clips its update to C and adds Gaussian noise itself before sending, with a noise
multiplier taken from its own recipe (never from the server). Two datasets of one site give clipped updates up
to 2C apart, so the sensitivity is 2C and the std is z * 2C. The rounds compose as R Gaussian mechanisms
(sample rate 1: the server sees who took part, so sampling does not amplify); z is calibrated with the same RDP
accountant, which is valid at every epsilon (the classic sqrt(2 ln(1.25/delta)) / epsilon bound is valid only for
epsilon <= 1). The figure is each site's worst case: a site asked in every round (a round counts when the sites are
asked, skipped or not); each site also refuses to send more than ``federated.rounds`` noised updates.
"""

from __future__ import annotations

from keel.errors import KeelError

CLIP_TOLERANCE = 1e-3  # float32 rounding of a clipped update; anything further over C was not clipped


def default_delta(sites: int) -> float:
    return 1.0 / (10 * sites)


def noise_for_budget(epsilon: float, delta: float, sample_rate: float, rounds: int) -> float:
    """The noise multiplier that spends ``epsilon`` in ``rounds`` rounds (Opacus RDP)."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=rounds, accountant="rdp"
            )
        )
    except ValueError as e:
        raise KeelError(
            f"federated.dp.epsilon={epsilon:g} at delta {delta:.2g} over {rounds} rounds needs more noise "
            f"than the accountant can calibrate ({e}); raise dp.epsilon or lower federated.rounds"
        ) from None


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


def _delta(cfg) -> float:
    delta = cfg.dp.delta if cfg.dp.delta is not None else default_delta(cfg.sites)
    if delta >= 1.0 / cfg.sites:  # also refused by the recipe's validator; a plan must never be made with it
        raise KeelError(
            f"federated.dp.delta={delta:g} is not below 1/sites={1 / cfg.sites:g}; a delta that large "
            f"allows naming a site outright: lower it (default 1/(10*sites))"
        )
    return delta


def local_noise(cfg) -> dict | None:
    """What one site does under local DP, from its own recipe: clip to C, add N(0, std^2) per coordinate."""
    if cfg.dp.mode != "local":
        return None
    z = noise_for_budget(cfg.dp.epsilon, _delta(cfg), 1.0, cfg.rounds)
    sensitivity = 2 * cfg.dp.clipping_norm  # any two datasets of the site: two clipped updates, each within C of 0
    return {
        "clipping_norm": cfg.dp.clipping_norm,
        "noise_multiplier": z,
        "sensitivity": sensitivity,
        "noise_std": z * sensitivity,
        "releases": cfg.rounds,
    }


def plan(cfg, sites_per_round: int) -> dict | None:
    """What the recipe's ``federated.dp`` means for this run: noise, delta, the budget. None when DP is off."""
    dp = cfg.dp
    if dp.mode == "none":
        return None
    delta = _delta(cfg)
    if dp.mode == "local":
        site = local_noise(cfg)
        return {
            "mode": "local",
            "epsilon_budget": dp.epsilon,
            "delta": delta,
            "sample_rate": 1.0,
            "accountant": "rdp",
            **site,
        }
    q = min(1.0, sites_per_round / cfg.sites)
    z = dp.noise_multiplier if dp.noise_multiplier is not None else noise_for_budget(dp.epsilon, delta, q, cfg.rounds)
    return {
        "mode": "central",
        "epsilon_budget": dp.epsilon,
        "delta": delta,
        "clipping_norm": dp.clipping_norm,
        "noise_multiplier": z,
        "sample_rate": q,
        "sites_per_round": sites_per_round,
        "sampling": "poisson",
        "noise_std": z * dp.clipping_norm / sites_per_round,
        "accountant": "rdp",
    }


def spent(p: dict, rounds_done: int) -> float:
    """Epsilon after ``rounds_done`` released rounds (local mode: each site's worst case)."""
    return epsilon_spent(p["noise_multiplier"], p["sample_rate"], rounds_done, p["delta"])


def round_allowed(p: dict | None, rounds_done: int) -> bool:
    """Whether one more round stays within the budget (always, without a budget)."""
    if p is None or p.get("epsilon_budget") is None:
        return True
    return spent(p, rounds_done + 1) <= p["epsilon_budget"] * (1 + 1e-6)
