"""The server side's glue around a Flower strategy: what keel checks before anything is averaged.

``Guard`` wraps the strategy Flower runs (FedAvg, FedProx, FedAdam, Krum, trimmed mean) and adds, per round:
- validation of every update: number of arrays, dtype, shape, finite values, L2 norm of the change; a bad
  update is dropped and its site named in the log (under SecAgg+ the server only ever holds the sum, so
  the check applies to the aggregate and a bad one skips the round);
- a minimum completion rate: too few usable updates (drop-outs + rejections) and the round is skipped,
  the global model stays as it was, and the skip is logged;
- central DP (privacy.py): Poisson sampling of the sites, a per-site clipping check, the noised fixed-denominator
  sum of the clipped updates handed to the inner strategy as the round's one update (so FedAdam steps on the
  noised mean); drop-outs and rejected updates are zero terms of that sum;
- the privacy budget: no round starts that would spend more than federated.dp.epsilon;
- after each round, the caller's ``on_round`` (evaluation, metrics, the round checkpoint).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable

import numpy as np

from keel.federated import privacy

logger = logging.getLogger(__name__)


def check_update(arrays: list[np.ndarray], reference: list[np.ndarray], max_norm: float | None = None) -> str | None:
    """Why an update cannot be averaged (None if it can). ``reference``: the global weights it started from."""
    if len(arrays) != len(reference):
        return f"sent {len(arrays)} arrays, expected {len(reference)}"
    sq = 0.0
    for i, (a, ref) in enumerate(zip(arrays, reference)):
        if a.dtype != ref.dtype:
            return f"array {i} has dtype {a.dtype}, expected {ref.dtype}"
        if a.shape != ref.shape:
            return f"array {i} has shape {tuple(a.shape)}, expected {tuple(ref.shape)}"
        if not np.all(np.isfinite(a)):
            return f"array {i} has non-finite values (NaN or inf)"
        sq += float(np.sum((a.astype(np.float64) - ref.astype(np.float64)) ** 2))
    if max_norm is not None and math.sqrt(sq) > max_norm:
        return f"update norm {math.sqrt(sq):.4g} is over the bound federated.max_update_norm={max_norm:g}"
    return None


def build_strategy(fed, initial: list[np.ndarray], dp_plan: dict | None):
    """The Flower strategy the recipe names, started from ``initial``, wrapped for central DP if asked."""
    from flwr.common import ndarrays_to_parameters
    from flwr.server import strategy as S

    common = dict(
        fraction_fit=fed.fraction_fit,
        fraction_evaluate=0.0,
        min_fit_clients=fed.min_fit_clients,
        min_evaluate_clients=0,
        min_available_clients=fed.min_available_clients,
        initial_parameters=ndarrays_to_parameters(initial),
        accept_failures=True,
    )
    st = fed.strategy
    if st.name == "fedavg":
        inner = S.FedAvg(**common)
    elif st.name == "fedprox":
        inner = S.FedProx(**common, proximal_mu=st.proximal_mu)
    elif st.name == "fedadam":
        inner = S.FedAdam(**common, eta=st.server_lr, eta_l=fed.local_lr or 1e-3)
    elif st.name == "krum":
        inner = S.Krum(**common, num_malicious_clients=st.num_malicious, num_clients_to_keep=0)
    else:
        inner = S.FedTrimmedAvg(**common, beta=st.trim_beta)
    # Central DP is not Flower's DifferentialPrivacyClientSideFixedClipping: that wrapper drops a round at the first
    # failure and adds its noise after the inner strategy (after FedAdam's step). Guard noises the sum itself.
    return inner


def sites_per_round(fed) -> int:
    """How many sites Flower's samplers pick per round (as FedAvg.num_fit_clients computes it)."""
    return max(int(fed.sites * fed.fraction_fit), fed.min_fit_clients)


def update_norm(arrays: list[np.ndarray], reference: list[np.ndarray]) -> float:
    return math.sqrt(
        sum(float(np.sum((a.astype(np.float64) - r.astype(np.float64)) ** 2)) for a, r in zip(arrays, reference))
    )


class _Chosen:
    """A ClientManager stand-in that hands the inner strategy the sites keel sampled (it builds their FitIns)."""

    def __init__(self, available: int, chosen: list):
        self.available, self.chosen = available, chosen

    def num_available(self) -> int:
        return self.available

    def sample(self, num_clients, min_num_clients=None, criterion=None):
        return list(self.chosen)


def _strategy_base():
    from flwr.server.strategy import Strategy

    return Strategy


class Guard(_strategy_base()):
    """A Flower ``Strategy`` that validates, counts and records around an inner strategy (see the module doc)."""

    def __init__(
        self,
        inner,
        fed,
        *,
        fit_config: dict,
        on_round: Callable[[int, list, dict], tuple[float, dict]],
        offset: int = 0,
        dp_plan: dict | None = None,
        dp_rounds: int = 0,
    ):
        self.inner, self.fed, self.fit_config, self.on_round = inner, fed, fit_config, on_round
        self.offset, self.dp_plan, self.dp_rounds = offset, dp_plan, dp_rounds
        self._reference: list[np.ndarray] | None = None
        self._sampled, self._round_info, self._t0 = 0, {}, time.perf_counter()

    # Flower calls these ------------------------------------------------------------------------
    def initialize_parameters(self, client_manager):
        return self.inner.initialize_parameters(client_manager)

    @property
    def central_dp(self) -> bool:
        return bool(self.dp_plan) and self.dp_plan["mode"] == "central"

    def configure_fit(self, server_round, parameters, client_manager):
        from flwr.common import parameters_to_ndarrays

        r = server_round + self.offset
        self._t0 = time.perf_counter()
        if not privacy.round_allowed(self.dp_plan, self.dp_rounds):
            self._round_info = {"skipped": "privacy budget reached"}
            logger.warning(
                f"round {r}: not run: one more round would spend more than "
                f"federated.dp.epsilon={self.dp_plan['epsilon_budget']:g}"
            )
            return []
        self._reference = parameters_to_ndarrays(parameters)
        if self.central_dp and self.dp_plan["sample_rate"] < 1.0:
            client_manager = self._poisson(client_manager)
        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        for _, ins in instructions:
            ins.config.update({**self.fit_config, "round": r})
        self._sampled = len(instructions)
        if instructions and self.dp_plan and self.dp_plan["mode"] == "local":
            self.dp_rounds += 1  # each asked site releases a noised update now, whatever the server does with it
        if not instructions:
            self._round_info = {"sampled": 0, "completed": 0, "skipped": "no site sampled"}
            logger.warning(f"round {r}: skipped: no site sampled; the global model is unchanged")
        return instructions

    def _poisson(self, client_manager) -> _Chosen:
        """Every available site independently with probability q: the sampling the RDP accountant assumes.

        The draw uses the operating system's randomness: amplification by sampling needs a sample nobody can
        predict from the recipe.
        """
        if hasattr(client_manager, "wait_for"):
            client_manager.wait_for(self.fed.min_available_clients, timeout=self.fed.server.round_timeout or 86400)
        available = sorted(client_manager.all().values(), key=lambda c: str(c.cid))
        draw = secrets.SystemRandom()
        chosen = [c for c in available if draw.random() < self.dp_plan["sample_rate"]]
        return _Chosen(len(available), chosen)

    def aggregate_fit(self, server_round, results, failures):
        from flwr.common import parameters_to_ndarrays

        r = server_round + self.offset
        secagg = self.fed.secagg.enabled
        if secagg and results:
            results = self._secagg_sum(r, results)
        clip = self.dp_plan["clipping_norm"] * (1 + privacy.CLIP_TOLERANCE) if self.central_dp else None
        kept, rejected, norms = [], [], []
        for proxy, res in results:
            site = str(res.metrics.get("site", getattr(proxy, "cid", "?")))
            arrays = parameters_to_ndarrays(res.parameters)
            why = check_update(arrays, self._reference, self.fed.max_update_norm)
            if why is None and clip is not None:
                norms.append(update_norm(arrays, self._reference))
                if norms[-1] > clip:
                    why = (
                        f"{'the aggregate of' if secagg else 'update'} norm {norms[-1]:.4g} is over "
                        f"federated.dp.clipping_norm={self.dp_plan['clipping_norm']:g}: "
                        f"{'some site' if secagg else 'the site'} did not clip, so central DP cannot count it"
                    )
            if why is None and self.dp_plan and self.dp_plan["mode"] == "local":
                why = self._check_local_noise(res.metrics)
            if why:
                logger.warning(f"round {r}: rejected the update of site {site}: {why}")
                rejected.append(site)
            else:
                kept.append((proxy, res))
        needed = max(1, math.ceil(self.fed.min_completion * self._sampled))
        info = {"sampled": self._sampled, "completed": len(kept), "failed": len(failures), "rejected": rejected}
        if norms:  # what reached the server, before any re-clipping: the report's evidence that sites clip
            info["max_update_norm"] = max(norms)
        if len(kept) < needed:
            info["skipped"] = f"{len(kept)} usable updates of {self._sampled} sampled, {needed} needed"
            logger.warning(
                f"round {r}: skipped: {info['skipped']} (federated.min_completion="
                f"{self.fed.min_completion:g}); the global model is unchanged"
            )
            self._round_info = info
            return None, {}
        dropped = list(failures) + [RuntimeError(f"rejected {s}") for s in rejected]
        if self.central_dp:
            # one update, the noised mean, replaces the sites' updates: drop-outs are already zero terms of it
            kept, dropped = [self._noised_mean(kept, secagg)], []
        params, metrics = self.inner.aggregate_fit(
            r, kept, dropped
        )  # the run's round: FedAdam's bias correction uses it
        if params is not None:  # FedAdam computes in float64: the global model keeps the model's own dtypes
            from flwr.common import ndarrays_to_parameters

            params = ndarrays_to_parameters(
                [a.astype(ref.dtype, copy=False) for a, ref in zip(parameters_to_ndarrays(params), self._reference)]
            )
        if params is None:
            info["skipped"] = "the strategy returned no aggregate"
            logger.warning(f"round {r}: skipped: {info['skipped']} ({len(dropped)} failures)")
        elif self.central_dp:
            self.dp_rounds += 1
        losses = [(res.num_examples, float(res.metrics["loss"])) for _, res in kept if "loss" in res.metrics]
        if losses and not self.dp_plan:  # under DP the sites' own losses are not released
            info["train_loss"] = sum(n * v for n, v in losses) / max(1, sum(n for n, _ in losses))
        self._round_info = info
        return params, metrics

    def _noised_mean(self, kept, secagg: bool):
        """``w + (sum of clipped updates + N(0, (z C)^2 I)) / m``, m = the planned sites per round (privacy.py)."""
        from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

        p = self.dp_plan
        c, m = p["clipping_norm"], p["sites_per_round"]
        ref = [a.astype(np.float64) for a in self._reference]
        total = [np.zeros_like(a) for a in ref]
        # Under SecAgg+ every result holds the same mean of the k surviving sites: the sum is k times its update.
        updates = (
            [parameters_to_ndarrays(kept[0][1].parameters)] * len(kept)
            if secagg
            else [parameters_to_ndarrays(res.parameters) for _, res in kept]
        )
        for arrays in updates:
            delta = [a.astype(np.float64) - w for a, w in zip(arrays, ref)]
            norm = math.sqrt(sum(float(np.sum(d * d)) for d in delta))
            scale = 1.0 if secagg else min(1.0, c / norm) if norm > 0 else 1.0  # exact: the bound holds in float64
            for t, d in zip(total, delta):
                t += scale * d
        rng = np.random.default_rng(secrets.randbits(128))  # fresh OS entropy every round; never the recipe seed
        std = p["noise_multiplier"] * c
        noised = [
            (w + (t + rng.normal(0.0, std, size=t.shape)) / m).astype(a.dtype)
            for w, t, a in zip(ref, total, self._reference)
        ]
        res = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(noised), num_examples=1, metrics={})
        return kept[0][0], res

    def _check_local_noise(self, metrics) -> str | None:
        """Local DP: the site says which noise it added; less than the recipe plans (or none) is refused."""
        planned = self.dp_plan["noise_std"]
        got = metrics.get("dp_noise_std")
        if got is None or float(got) < planned * (1 - 1e-9):
            return (
                f"it reports local DP noise std {got}, the recipe plans {planned:.4g} (federated.dp.mode=local): "
                f"run the site with the same recipe"
            )
        return None

    def _secagg_sum(self, r: int, results):
        """Under SecAgg+ every result carries the same unmasked aggregate (the server sees nothing else).

        It is dequantized as float64: cast back to the model's dtypes, then it is validated like one update.
        Per-site checks are impossible by design here; a bad aggregate skips the round.
        """
        from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

        arrays = parameters_to_ndarrays(results[0][1].parameters)
        if len(arrays) == len(self._reference):
            arrays = [
                a.astype(ref.dtype, copy=False) if a.shape == ref.shape else a
                for a, ref in zip(arrays, self._reference)
            ]
        params = ndarrays_to_parameters(arrays)
        for i, (_, res) in enumerate(results):
            res.parameters = params
            res.metrics = {**res.metrics, "site": res.metrics.get("site", f"aggregate-{i}")}
        return results

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        """Called by Flower after every round with the global weights: evaluate, log, checkpoint."""
        from flwr.common import parameters_to_ndarrays

        if server_round == 0 and self.offset > 0:
            return None  # the resumed weights were evaluated when their round ended
        r = server_round + self.offset
        info = {**self._round_info, "seconds": round(time.perf_counter() - self._t0, 3), "dp_rounds": self.dp_rounds}
        if self.dp_plan:
            info["epsilon"] = privacy.spent(self.dp_plan, self.dp_rounds)
        self._round_info = {}
        return self.on_round(r, parameters_to_ndarrays(parameters), info)
