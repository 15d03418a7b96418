"""Recipe section for federated learning: federated.*."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from keel.recipe.base import Strict


class FederatedConfig(Strict):
    """Federated learning with Flower (`keel federate`): sites, strategy, rounds, SecAgg+, DP, validation."""

    class Partition(Strict):
        """How the simulation splits the data into sites."""

        kind: Literal["iid", "dirichlet", "column"] = Field(
            "iid", description="how the simulation splits the data into sites"
        )
        alpha: float = Field(0.5, gt=0.0, description="Dirichlet concentration for label skew (smaller = more skew)")
        column: str | None = Field(None, description="for kind=column: one site per value of this source column")
        seed: int = Field(0, description="seed of the partition")

    class Strategy(Strict):
        """How the server combines the sites' updates."""

        name: Literal["fedavg", "fedprox", "fedadam", "krum", "trimmed-mean"] = Field(
            "fedavg", description="aggregation rule"
        )
        proximal_mu: float = Field(0.01, ge=0.0, description="FedProx proximal term")
        server_lr: float = Field(0.01, gt=0.0, description="FedAdam server learning rate (eta)")
        num_malicious: int = Field(0, ge=0, description="Krum: poisoned sites to tolerate")
        trim_beta: float = Field(0.2, ge=0.0, lt=0.5, description="trimmed mean: fraction cut at each end")

    class SecAgg(Strict):
        """SecAgg+ secure aggregation: the server sees only the sum of the sites' updates."""

        enabled: bool = Field(False, description="mask updates with SecAgg+")
        num_shares: int = Field(3, ge=2, description="secret shares per site")
        reconstruction_threshold: int = Field(2, ge=2, description="shares needed to recover a dropped site's mask")
        clipping_range: float = Field(8.0, gt=0.0, description="values are clipped to +-this before quantization")
        quantization_range: int = Field(4194304, ge=2, description="integer range values are quantized to")

    class DP(Strict):
        """Client-level differential privacy (each site's whole data is the unit)."""

        mode: Literal["none", "central", "local"] = Field(
            "none", description="central: clip at the site, noise at the server"
        )
        epsilon: float | None = Field(
            None, gt=0.0, description="privacy budget; the noise is calibrated to it and enforced"
        )
        delta: float | None = Field(None, gt=0.0, lt=1.0, description="default 1/(10 * sites)")
        clipping_norm: float = Field(1.0, gt=0.0, description="L2 bound on each site's update")
        noise_multiplier: float | None = Field(None, ge=0.0, description="set it instead of epsilon (central mode)")

    class Server(Strict):
        """`keel federate serve`: address and TLS."""

        address: str = Field("127.0.0.1:9092", description="HOST:PORT that `keel federate serve` listens on")
        root_certificate: str | None = Field(None, description="CA certificate (PEM) for TLS")
        certificate: str | None = Field(None, description="server certificate (PEM), with private_key")
        private_key: str | None = Field(None, description="server private key (PEM); a path, never the key itself")
        round_timeout: float | None = Field(600.0, gt=0.0, description="seconds a round waits for its sites")

    sites: int = Field(10, ge=1, le=1_000_000, description="simulated sites (simulation) or expected sites (serve)")
    rounds: int = Field(5, ge=1, description="federated rounds")
    fraction_fit: float = Field(1.0, gt=0.0, le=1.0, description="share of sites sampled per round")
    min_fit_clients: int = Field(2, ge=1, description="sites that must train in a round")
    min_available_clients: int = Field(2, ge=1, description="sites that must be connected before a round starts")
    local_epochs: int = Field(1, ge=1, description="passes over its own data each site makes per round")
    local_steps: int | None = Field(None, ge=1, description="cap on local optimiser steps per round")
    local_optimizer: Literal["adamw", "sgd"] = Field("adamw", description="the sites' optimiser")
    local_lr: float | None = Field(None, gt=0.0, lt=1.0, description="default: train.lr")
    min_completion: float = Field(
        0.5, gt=0.0, le=1.0, description="a round needs this share of its sampled sites, else it is skipped"
    )
    max_update_norm: float | None = Field(None, gt=0.0, description="updates with a larger L2 norm are rejected")
    partition: Partition = Partition()
    strategy: Strategy = Strategy()
    secagg: SecAgg = SecAgg()
    dp: DP = DP()
    server: Server = Server()
    num_cpus: int = Field(2, ge=1, description="CPUs the simulation may use (Ray)")
    cpus_per_site: float = Field(
        1.0, gt=0.0, description="CPUs each simulated site takes (sites run in parallel up to num_cpus / this)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> FederatedConfig:
        if self.partition.kind == "column" and not self.partition.column:
            raise ValueError("partition.kind=column needs partition.column (the source column that names the site)")
        if self.secagg.enabled and self.secagg.reconstruction_threshold > self.secagg.num_shares:
            raise ValueError("secagg.reconstruction_threshold must be <= secagg.num_shares")
        if self.dp.mode == "local" and self.dp.epsilon is None:
            raise ValueError("dp.mode=local needs dp.epsilon (the per-round budget of each site's update)")
        if self.dp.mode == "central" and self.dp.epsilon is None and self.dp.noise_multiplier is None:
            raise ValueError("dp.mode=central needs dp.epsilon (a budget) or dp.noise_multiplier")
        for key in ("min_available_clients", "min_fit_clients"):
            if getattr(self, key) > self.sites:
                raise ValueError(
                    f"{key}={getattr(self, key)} is more than sites={self.sites}: the rounds would wait "
                    f"for sites that do not exist; lower it or raise federated.sites"
                )
        self._dp_accountable()
        return self

    def _dp_accountable(self) -> None:
        """Only settings whose privacy keel can state (keel/federated/privacy.py); checked here, without torch."""
        dp = self.dp
        if dp.mode == "none":
            return
        if dp.delta is not None and dp.delta >= 1.0 / self.sites:
            raise ValueError(
                f"dp.delta={dp.delta:g} is not below 1/sites={1 / self.sites:g}; a delta that large allows "
                f"naming a site outright: lower it (default 1/(10*sites))"
            )
        if dp.noise_multiplier is not None and dp.mode == "local":
            raise ValueError(
                "dp.noise_multiplier is for dp.mode=central; local DP calibrates each site's noise to dp.epsilon"
            )
        if dp.noise_multiplier == 0:
            raise ValueError(
                "dp.noise_multiplier=0 adds no noise (clipping alone is not DP); set it above 0 or set "
                "dp.epsilon instead"
            )
        if dp.mode == "central" and self.strategy.name in ("krum", "trimmed-mean"):
            why = (
                "Krum returns one site's update"
                if self.strategy.name == "krum"
                else "the trimmed mean cuts each coordinate by the other sites' values"
            )
            raise ValueError(
                f"strategy.name={self.strategy.name} with dp.mode=central: {why}, so one site can move "
                f"the result by more than clipping_norm/m and keel cannot calibrate the noise; use "
                f"strategy.name fedavg, fedprox or fedadam, or dp.mode=local (sites add their own noise)"
            )
