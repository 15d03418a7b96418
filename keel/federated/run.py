"""`keel federate`: one recipe, trained across sites, as a simulation or as separate processes.

- ``simulate``: Flower's simulation engine (Ray) runs ``federated.sites`` virtual sites in one process tree;
  the training split is cut into sites (federated.partition). SecAgg+ runs here through Flower's
  ``SecAggPlusWorkflow``.
- ``serve`` / ``join``: a server process and one process per site talking Flower's gRPC (TLS when
  certificates are given). Each site reads only its own file.

Both leave an ordinary run directory: model/ (the final global model), metrics.jsonl (one record per round),
train.json, eval/test.json, report.html, and federated/round-XXXXX/ checkpoints (safetensors) from which
``--resume`` continues after the last completed round.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from keel.errors import CheckpointError, KeelError
from keel.federated import privacy
from keel.federated.common import (
    Setup,
    build_model,
    data_recipe,
    fed_section,
    quiet_flower,
    setup,
    site_partitions,
    site_settings,
)
from keel.federated.guard import Guard, build_strategy, sites_per_round
from keel.federated.remote import serve_rounds
from keel.federated.rounds import load_round, restore_moments, save_round, server_moments
from keel.federated.site import get_weights, make_client, set_weights, weight_specs
from keel.io import atomic_write_json
from keel.progress import progress
from keel.recipe import Recipe
from keel.rundir import ROUNDS

logger = logging.getLogger(__name__)


class Coordinator:
    """The server's view of a run: the global model, evaluation, per-round records, checkpoints."""

    def __init__(self, s: Setup, run_dir: Path, resume: bool):
        from keel.metrics import MetricLog

        self.s, self.run_dir, self.fed = s, run_dir, s.recipe.federated
        self.labels = s.data.labels
        import torch

        torch.manual_seed(s.recipe.train.seed)  # the fresh classification head: the same start on every run
        self.model = build_model(s, self.labels)
        self.specs = weight_specs(self.model)
        self.root = run_dir / ROUNDS  # round-XXXXX/
        self.dp_plan = privacy.plan(self.fed, sites_per_round(self.fed))
        self.offset, self.dp_rounds, self.history = 0, 0, []
        self.moments: dict = {}  # a restarted FedAdam server goes on with its moments, not fresh ones
        self.inner = None
        self.initial = get_weights(self.model)
        if resume:
            found = load_round(self.root, self.specs)
            if found is None:
                raise CheckpointError(f"nothing to resume: {self.root} has no complete round; run without --resume")
            self.initial, st = found
            self.offset, self.dp_rounds, self.history = st["round"], st.get("dp_rounds", 0), st.get("history", [])
            self.moments = st.get("server_moments", {})
            logger.info(f"resuming after round {self.offset} of {self.fed.rounds}")
        self.metrics = MetricLog(run_dir, resume_step=self.offset if resume else None)
        self.t0 = time.perf_counter()
        self._bar = None

    @property
    def remaining(self) -> int:
        return max(0, self.fed.rounds - self.offset)

    def strategy(self) -> Guard:
        fed = self.fed
        fit_config = {"local_epochs": fed.local_epochs, "labels": json.dumps(self.labels)}
        if fed.local_steps:
            fit_config["local_steps"] = fed.local_steps
        if self.dp_plan:  # local DP: each site takes its clipping and noise from its own recipe (site_settings)
            fit_config["uniform_weights"] = True
            if self.dp_plan["mode"] == "central":
                fit_config["clipping_norm"] = self.dp_plan["clipping_norm"]
        inner = self.inner = build_strategy(fed, self.initial, self.dp_plan)
        restore_moments(inner, self.moments)
        return Guard(
            inner,
            fed,
            fit_config=fit_config,
            on_round=self.on_round,
            offset=self.offset,
            dp_plan=self.dp_plan,
            dp_rounds=self.dp_rounds,
        )

    def evaluate(self, arrays) -> dict:
        import torch

        from keel.tasks.classification import evaluate

        split = self.s.data.splits["validation"]
        if len(split) == 0:
            return {}
        set_weights(self.model, arrays)
        r = evaluate(self.model, split, self.s.tokenizer, self.s.recipe.train.eval_batch_size, torch.device("cpu"))
        return {k: v for k, v in r.items() if isinstance(v, (int, float))}

    def on_round(self, r: int, arrays: list, info: dict):
        result = self.evaluate(arrays)
        record = {"split": "validation", "step": r, "epoch": r, "round": r, **result, **info}
        self.metrics.write(record)
        self.history.append(record)
        save_round(
            self.root,
            r,
            self.specs,
            arrays,
            {"dp_rounds": info.get("dp_rounds", 0), "history": self.history},
            keep=self.s.recipe.train.keep_last_k,
            moments=server_moments(self.inner) if self.inner else None,
        )
        self.dp_rounds = info.get("dp_rounds", self.dp_rounds)
        self.final = arrays
        shown = ", ".join(f"{k} {result[k]:.4f}" for k in ("loss", "accuracy", "macro_f1") if k in result)
        extra = f", epsilon {info['epsilon']:.3f}" if "epsilon" in info else ""
        if r > 0:
            logger.info(
                f"round {r}/{self.fed.rounds}: {info.get('completed', 0)}/{info.get('sampled', 0)} sites, "
                f"validation {shown}{extra} ({info['seconds']:.1f}s)"
            )
        else:
            logger.info(f"round 0 (initial model): validation {shown}")
        if self._bar is not None and r > 0:
            self._bar[0].update(self._bar[1], completed=r, info=shown)
        return result.get("loss", 0.0), {k: v for k, v in result.items() if k in ("accuracy", "macro_f1")}

    def finish(self) -> dict:
        """The final global model into run_dir/model, train.json with the per-round history."""
        from keel.train.engine import save_final_model

        self.metrics.close()
        done = [h for h in self.history if h["round"] > 0]
        if not hasattr(self, "final"):
            found = load_round(self.root, self.specs)
            if found is None:
                raise KeelError("no round finished; see the log above for why the sites did not train")
            self.final = found[0]
        set_weights(self.model, self.final)
        last = self.history[-1] if self.history else {}
        summary = {
            "federated": True,
            "rounds_done": last.get("round", self.offset),
            "rounds_planned": self.fed.rounds,
            "rounds_skipped": sum(1 for h in done if h.get("skipped")),
            "strategy": self.fed.strategy.name,
            "sites": self.fed.sites,
            "secagg": self.fed.secagg.enabled,
            "best_step": last.get("round"),
            "best_metric": last.get("macro_f1"),
            "selection_metric": "macro_f1",
            "labels": self.labels,
            "data": self.s.data.meta,
            "steps": last.get("round", 0),
            "train_seconds_this_session": round(time.perf_counter() - self.t0, 2),
            "seconds_per_round": round(sum(h.get("seconds", 0) for h in done) / max(1, len(done)), 3),
        }
        if self.dp_plan:
            summary["privacy"] = {
                **self.dp_plan,
                "rounds_with_noise": self.dp_rounds,
                "epsilon_spent": privacy.spent(self.dp_plan, self.dp_rounds),
            }
        save_final_model(self.model, self.s.tokenizer, self.run_dir / "model", self.s.recipe, summary)
        atomic_write_json(self.run_dir / "train.json", summary)
        return summary


def _announce(c: Coordinator) -> None:
    p = c.dp_plan
    if p is None:
        return
    if p["mode"] == "central":
        eps = privacy.spent(p, c.fed.rounds)
        logger.info(
            f"DP (central): clip {p['clipping_norm']:g}, noise multiplier {p['noise_multiplier']:.3f}, "
            f"{p['sites_per_round']} of {c.fed.sites} sites per round: epsilon {eps:.3f} at delta {p['delta']:.2g} "
            f"after {c.fed.rounds} rounds" + (f" (budget {p['epsilon_budget']:g})" if p["epsilon_budget"] else "")
        )
    else:
        logger.info(
            f"DP (local): each site clips to {p['clipping_norm']:g} and adds Gaussian noise of std {p['noise_std']:.4g} "
            f"(noise multiplier {p['noise_multiplier']:.3f} on sensitivity {p['sensitivity']:g}): epsilon "
            f"{privacy.spent(p, c.fed.rounds):.3f} per site at delta {p['delta']:.2g} after {c.fed.rounds} rounds "
            f"(budget {p['epsilon_budget']:g})"
        )


class FederatedTrainer:
    """`keel federate [serve] RECIPE` as keel's Trainer (keel/pipeline.py): ``mode`` simulate (Flower's
    simulation engine) or serve (gRPC, sites join with `keel federate join`). Resumes after the last round."""

    resumable = True

    def __init__(self, recipe: Recipe, resume: bool = False, mode: str = "simulate", **options):
        if mode not in ("simulate", "serve"):
            raise KeelError(f"keel federate: mode must be simulate or serve; got {mode!r}")
        self.recipe, self.resume = recipe, resume
        self.body = _simulation(recipe, **options) if mode == "simulate" else serve_rounds(recipe, **options)
        data_recipe(recipe)  # a wrong site column fails before any folder is made

    def setup(self, run_dir: Path) -> None:
        self.s = setup(self.recipe)
        self.c = Coordinator(self.s, run_dir, self.resume)
        _announce(self.c)

    def train(self) -> None:
        c = self.c
        if not c.remaining:
            logger.info("all rounds are done already; writing the final model again")
            return
        with progress("round") as bar:
            c._bar = (bar, bar.add_task("federated rounds", total=c.fed.rounds, completed=c.offset, info=""))
            self.body(self.s, c)

    def save(self) -> dict:
        return self.c.finish()

    def cleanup(self) -> None:
        pass


# -- simulation --------------------------------------------------------------------------------------

_SITE_CACHE: dict = {}


def _sim_site(recipe_json: str, pid: int, threads: int):
    """Inside a simulation worker: this site's rows (from keel's tokenized cache) and a model, built once."""
    import torch

    from keel.recipe import validate_recipe

    key = (recipe_json, pid)
    if key not in _SITE_CACHE:
        torch.set_num_threads(threads)
        if recipe_json not in _SITE_CACHE:
            s = setup(validate_recipe(json.loads(recipe_json)))
            _SITE_CACHE[recipe_json] = (s, site_partitions(s))
        s, parts = _SITE_CACHE[recipe_json]
        rows = s.data.splits["train"].select(parts[pid])

        def load(labels):
            # one model per worker process, shared by the sites it plays: every fit starts by loading the weights
            if ("model", recipe_json) not in _SITE_CACHE:
                _SITE_CACHE[("model", recipe_json)] = build_model(s, labels or s.data.labels)
            return _SITE_CACHE[("model", recipe_json)], s.tokenizer, rows

        _SITE_CACHE[key] = make_client(f"site-{pid}", load, site_settings(s.recipe))
    return _SITE_CACHE[key]


def _simulation(recipe: Recipe, debug: bool = False):
    """`keel federate RECIPE`: every site simulated by Flower's simulation engine on this machine. Checks the
    settings now; returns the rounds as ``body(setup, coordinator)`` for FederatedTrainer.train."""
    fed = fed_section(recipe)
    quiet_flower(debug)

    def body(s: Setup, c: Coordinator) -> None:
        site_partitions(s)  # bad partition settings fail here, in this process, with keel's message
        from flwr.client import ClientApp
        from flwr.client.mod import secaggplus_mod
        from flwr.common import Context
        from flwr.server import LegacyContext, ServerApp, ServerConfig
        from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
        from flwr.simulation import run_simulation

        guard = c.strategy()
        recipe_json = json.dumps(recipe.model_dump(mode="json"))
        threads = max(1, int(fed.cpus_per_site))

        def client_fn(context: Context):
            return _sim_site(recipe_json, int(context.node_config["partition-id"]), threads).to_client()

        server_app = ServerApp()

        @server_app.main()
        def main(grid, context) -> None:
            ctx = LegacyContext(context=context, config=ServerConfig(num_rounds=c.remaining), strategy=guard)
            fit = None
            if fed.secagg.enabled:
                fit = SecAggPlusWorkflow(
                    num_shares=fed.secagg.num_shares,
                    reconstruction_threshold=fed.secagg.reconstruction_threshold,
                    clipping_range=fed.secagg.clipping_range,
                    quantization_range=fed.secagg.quantization_range,
                )
            DefaultWorkflow(fit_workflow=fit)(grid, ctx)

        client_app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if fed.secagg.enabled else [])
        before = len(c.history)
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=fed.sites,
            backend_config={
                "client_resources": {"num_cpus": fed.cpus_per_site, "num_gpus": 0.0},
                "init_args": {
                    "num_cpus": fed.num_cpus,
                    "include_dashboard": False,
                    "logging_level": logging.ERROR,
                    "log_to_driver": debug,
                },
            },
            verbose_logging=debug,
        )
        if len(c.history) - before < c.remaining:
            raise KeelError(
                f"the simulation stopped after {len(c.history) - before} of {c.remaining} evaluations; "
                f"run again with --debug for Flower's log, then `keel federate RECIPE --resume`"
            )

    return body
