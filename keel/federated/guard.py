"""The server side's glue around a Flower strategy: what keel checks before anything is averaged.

``Guard`` wraps the strategy Flower runs (FedAvg, FedProx, FedAdam, Krum, trimmed mean, optionally inside
Flower's DP wrapper) and adds, per round:
- validation of every update: number of arrays, dtype, shape, finite values, L2 norm of the change; a bad
  update is dropped and its site named in the log (under SecAgg+ the server only ever holds the sum, so
  the check applies to the aggregate and a bad one skips the round);
- a minimum completion rate: too few usable updates (drop-outs + rejections) and the round is skipped,
  the global model stays as it was, and the skip is logged;
- the privacy budget: no round starts that would spend more than federated.dp.epsilon;
- after each round, the caller's ``on_round`` (evaluation, metrics, the round checkpoint).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

from keel.federated import privacy
from keel.progress import esc, log


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

    common = dict(fraction_fit=fed.fraction_fit, fraction_evaluate=0.0, min_fit_clients=fed.min_fit_clients,
                  min_evaluate_clients=0, min_available_clients=fed.min_available_clients,
                  initial_parameters=ndarrays_to_parameters(initial), accept_failures=True)
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
    if dp_plan and dp_plan["mode"] == "central":
        inner = S.DifferentialPrivacyClientSideFixedClipping(
            inner, noise_multiplier=dp_plan["noise_multiplier"], clipping_norm=dp_plan["clipping_norm"],
            num_sampled_clients=dp_plan["sites_per_round"])
    return inner


def sites_per_round(fed) -> int:
    """How many sites Flower's samplers pick per round (as FedAvg.num_fit_clients computes it)."""
    return max(int(fed.sites * fed.fraction_fit), fed.min_fit_clients)


def _strategy_base():
    from flwr.server.strategy import Strategy

    return Strategy


class Guard(_strategy_base()):
    """A Flower ``Strategy`` that validates, counts and records around an inner strategy (see the module doc)."""

    def __init__(self, inner, fed, *, fit_config: dict, on_round: Callable[[int, list, dict], tuple[float, dict]],
                 offset: int = 0, dp_plan: dict | None = None, dp_rounds: int = 0):
        self.inner, self.fed, self.fit_config, self.on_round = inner, fed, fit_config, on_round
        self.offset, self.dp_plan, self.dp_rounds = offset, dp_plan, dp_rounds
        self._reference: list[np.ndarray] | None = None
        self._sampled, self._round_info, self._t0 = 0, {}, time.perf_counter()

    # Flower calls these ------------------------------------------------------------------------
    def initialize_parameters(self, client_manager):
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round, parameters, client_manager):
        from flwr.common import parameters_to_ndarrays

        r = server_round + self.offset
        self._t0 = time.perf_counter()
        if not privacy.round_allowed(self.dp_plan, self.dp_rounds):
            self._round_info = {"skipped": "privacy budget reached"}
            log(f"round {r}: [yellow]not run: one more round would spend more than "
                f"federated.dp.epsilon={self.dp_plan['epsilon_budget']:g}[/]")
            return []
        self._reference = parameters_to_ndarrays(parameters)
        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        for _, ins in instructions:
            ins.config.update({**self.fit_config, "round": r})
        self._sampled = len(instructions)
        return instructions

    def aggregate_fit(self, server_round, results, failures):
        from flwr.common import parameters_to_ndarrays

        r = server_round + self.offset
        if self.fed.secagg.enabled and results:
            results = self._secagg_sum(r, results)
        kept, rejected = [], []
        for proxy, res in results:
            site = str(res.metrics.get("site", getattr(proxy, "cid", "?")))
            why = check_update(parameters_to_ndarrays(res.parameters), self._reference, self.fed.max_update_norm)
            if why:
                log(f"round {r}: [red]rejected the update of site {esc(site)}[/]: {esc(why)}")
                rejected.append(site)
            else:
                kept.append((proxy, res))
        needed = max(1, math.ceil(self.fed.min_completion * self._sampled))
        info = {"sampled": self._sampled, "completed": len(kept), "failed": len(failures), "rejected": rejected}
        if len(kept) < needed:
            info["skipped"] = f"{len(kept)} usable updates of {self._sampled} sampled, {needed} needed"
            log(f"round {r}: [yellow]skipped[/]: {info['skipped']} (federated.min_completion="
                f"{self.fed.min_completion:g}); the global model is unchanged")
            self._round_info = info
            return None, {}
        dropped = list(failures) + [RuntimeError(f"rejected {s}") for s in rejected]
        params, metrics = self.inner.aggregate_fit(r, kept, dropped)  # the run's round: FedAdam's bias correction uses it
        if params is not None:  # FedAdam computes in float64: the global model keeps the model's own dtypes
            from flwr.common import ndarrays_to_parameters

            params = ndarrays_to_parameters([a.astype(ref.dtype, copy=False) for a, ref in
                                             zip(parameters_to_ndarrays(params), self._reference)])
        if params is None:
            info["skipped"] = "the strategy returned no aggregate"
            log(f"round {r}: [yellow]skipped[/]: {info['skipped']} ({len(dropped)} failures)")
        elif self.dp_plan:
            self.dp_rounds += 1
        losses = [(res.num_examples, float(res.metrics["loss"])) for _, res in kept if "loss" in res.metrics]
        if losses:
            info["train_loss"] = sum(n * v for n, v in losses) / max(1, sum(n for n, _ in losses))
        self._round_info = info
        return params, metrics

    def _secagg_sum(self, r: int, results):
        """Under SecAgg+ every result carries the same unmasked aggregate (the server sees nothing else).

        It is dequantized as float64: cast back to the model's dtypes, then it is validated like one update.
        Per-site checks are impossible by design here; a bad aggregate skips the round.
        """
        from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

        arrays = parameters_to_ndarrays(results[0][1].parameters)
        if len(arrays) == len(self._reference):
            arrays = [a.astype(ref.dtype, copy=False) if a.shape == ref.shape else a for a, ref in zip(arrays, self._reference)]
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
