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
from dataclasses import dataclass
from pathlib import Path

from keel.errors import CheckpointError, KeelError
from keel.federated import privacy
from keel.federated.guard import Guard, build_strategy, sites_per_round
from keel.federated.site import get_weights, make_client, set_weights, weight_specs
from keel.io import atomic_dir, atomic_write_json, verify_manifest
from keel.progress import progress
from keel.recipe import Recipe
from keel.rundir import ROUNDS
from keel.train.engine import set_threads

logger = logging.getLogger(__name__)


def _fed(recipe: Recipe):
    if recipe.federated is None:
        raise KeelError(
            "the recipe has no federated: section; add one (the built-in recipe `federated` is an example: keel ls)"
        )
    return recipe.federated  # its task and site counts are checked by the recipe schema


def _quiet_flower(debug: bool = False) -> None:
    """Flower logs every protocol step (and deprecation notices); keel logs one line per round instead."""
    import os

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    logging.getLogger("flwr").setLevel(logging.INFO if debug else logging.ERROR)


def data_recipe(recipe: Recipe) -> Recipe:
    """For partition.kind=column the site column travels with the data as its `group` column."""
    fed = recipe.federated
    if fed is None or fed.partition.kind != "column":
        return recipe
    from keel.data.load import check_data_config, column_mapping
    from keel.recipe import Columns

    cols = {**column_mapping(recipe.data, recipe.task), "group": fed.partition.column}
    out = recipe.model_copy(update={"data": recipe.data.model_copy(update={"columns": Columns(**cols)})})
    try:
        check_data_config(out.data, out.task)
    except KeelError as e:  # name the field the user set
        raise type(e)(str(e).replace("data.columns.group", "federated.partition.column")) from None
    return out


@dataclass
class Setup:
    recipe: Recipe
    tokenizer: object
    data: object  # keel.data.prepare.Prepared
    model_path: Path


def setup(recipe: Recipe) -> Setup:
    from transformers import AutoTokenizer

    from keel.data.prepare import prepare_data
    from keel.models import model_dir

    path = model_dir(recipe.model.name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Setup(recipe, tokenizer, prepare_data(data_recipe(recipe), tokenizer), Path(path))


def build_model(s: Setup, labels: list[str]):
    from keel.tasks import get_task

    return get_task("classification").build_model(s.model_path, labels)


def site_partitions(s: Setup) -> list[list[int]]:
    from keel.federated.partition import partition

    fed, train = s.recipe.federated, s.data.splits["train"]
    groups = train["group"] if fed.partition.kind == "column" else None
    return partition(train["label"], fed.sites, fed.partition.kind, fed.partition.alpha, fed.partition.seed, groups)


def site_settings(recipe: Recipe) -> dict:
    fed, t = recipe.federated, recipe.train
    return {
        "batch_size": t.batch_size,
        "lr": fed.local_lr or t.lr,
        "optimizer": fed.local_optimizer,
        "max_grad_norm": t.max_grad_norm,
        "seed": t.seed,
        "local_epochs": fed.local_epochs,
        "local_dp": privacy.local_noise(fed),
    }


# -- round checkpoints ------------------------------------------------------------------------------


def save_round(root: Path, r: int, specs, arrays, state: dict, keep: int, moments: dict | None = None) -> None:
    """Round ``r``'s global weights, JSON state and the server optimiser's moments (FedAdam), sealed together."""
    import numpy as np
    from safetensors.numpy import save_file

    with atomic_dir(root / f"round-{r:05d}") as tmp:
        save_file(
            {name: np.ascontiguousarray(a) for (name, _, _), a in zip(specs, arrays)}, str(tmp / "weights.safetensors")
        )
        if moments:
            save_file({k: np.ascontiguousarray(a) for k, a in moments.items()}, str(tmp / "server_moments.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"round": r, **state}, indent=2))
    for old in sorted(root.glob("round-*"))[:-keep]:
        import shutil

        shutil.rmtree(old, ignore_errors=True)


def load_round(root: Path, specs) -> tuple[list, dict] | None:
    """The last complete round checkpoint: (arrays, state), or None. Every file is checked against its manifest."""
    from safetensors.numpy import load_file

    done = sorted(p for p in root.glob("round-*") if (p / "manifest.json").is_file())
    if not done:
        return None
    verify_manifest(done[-1])
    tensors = load_file(str(done[-1] / "weights.safetensors"))
    names = [n for n, _, _ in specs]
    if sorted(tensors) != sorted(names):
        raise CheckpointError(
            f"{done[-1]} holds weights of another model (model.name changed?); resume with the "
            f"original recipe or start a new run"
        )
    arrays = [tensors[n] for n in names]
    for (n, shape, _), a in zip(specs, arrays):
        if tuple(a.shape) != shape:
            raise CheckpointError(
                f"{done[-1]}: {n} has shape {tuple(a.shape)}, the model needs {shape}; "
                f"resume with the original model settings"
            )
    state = json.loads((done[-1] / "state.json").read_text())
    if (done[-1] / "server_moments.safetensors").is_file():
        state["server_moments"] = load_file(str(done[-1] / "server_moments.safetensors"))
    return arrays, state


SERVER_STATE = ("m_t", "v_t", "current_weights")  # FedOpt's moments and its float64 copy of the global model


def server_moments(strategy) -> dict:
    """A FedOpt strategy's (FedAdam's) optimiser state as named arrays; {} for strategies without one."""
    inner = getattr(strategy, "strategy", strategy)  # under Flower's central-DP wrapper
    if getattr(inner, "m_t", None) is None:
        return {}
    return {f"{name}.{i}": a for name in SERVER_STATE for i, a in enumerate(getattr(inner, name, None) or [])}


def restore_moments(strategy, moments: dict) -> None:
    inner = getattr(strategy, "strategy", strategy)
    for name in SERVER_STATE:
        keys = sorted((k for k in moments if k.startswith(name + ".")), key=lambda k: int(k.rsplit(".", 1)[1]))
        if keys:
            setattr(inner, name, [moments[k] for k in keys])


# -- the server side ----------------------------------------------------------------------------------


class Coordinator:
    """The server's view of a run: the global model, evaluation, per-round records, checkpoints."""

    def __init__(self, s: Setup, run_dir: Path, resume: bool):
        from keel.train.metrics import MetricLog

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
        self.body = _simulation(recipe, **options) if mode == "simulate" else _server(recipe, **options)
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
    fed = _fed(recipe)
    _quiet_flower(debug)

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


# -- separate processes ------------------------------------------------------------------------------


def _read_pem(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        raise KeelError(f"{what}: file '{path}' not found; pass the PEM file's path")
    return p.read_bytes()


def _server(
    recipe: Recipe,
    address: str | None = None,
    debug: bool = False,
    secret_file: str | None = None,
    allow_insecure: bool = False,
    allow_no_auth: bool = False,
):
    """`keel federate serve RECIPE`: the server; sites connect with `keel federate join`. Checks the settings
    now; returns the rounds as ``body(setup, coordinator)`` for FederatedTrainer.train.

    A non-loopback address needs TLS and a site secret unless ``allow_insecure`` / ``allow_no_auth`` say the
    network is trusted; with a secret, only sites that send it can join (see transport.py).
    """
    from keel.federated import transport

    fed = _fed(recipe)
    set_threads(recipe)
    if fed.secagg.enabled:
        raise KeelError(
            "federated.secagg runs in simulation (`keel federate RECIPE`); Flower 1.41's gRPC server for "
            "separate processes has no SecAgg+: set federated.secagg.enabled=false for serve"
        )
    srv = fed.server
    pems = [srv.root_certificate, srv.certificate, srv.private_key]
    if any(pems) and not all(pems):  # not a schema rule: a site's recipe may name only the root certificate (join)
        raise KeelError("TLS needs all three of federated.server.root_certificate, certificate and private_key")
    certificates = (
        tuple(_read_pem(p, n) for p, n in zip(pems, ("root_certificate", "certificate", "private_key")))
        if all(pems)
        else None
    )
    address = address or srv.address
    secret = transport.load_secret(secret_file)
    transport.check_serve(address, certificates is not None, secret, allow_insecure, allow_no_auth)
    _quiet_flower(debug)

    def body(s: Setup, c: Coordinator) -> None:
        tls = "TLS" if certificates else "insecure: loopback or a trusted network only"
        logger.info(
            f"serving on {address} ({tls}), {'sites need the federation secret' if secret else 'no site secret'}; "
            f"waiting up to {float(srv.round_timeout or 600):g}s for {fed.min_available_clients} sites"
        )
        transport.run_server(
            address,
            c.strategy(),
            num_rounds=c.remaining,
            round_timeout=srv.round_timeout,
            needed=fed.min_available_clients,
            offset=c.offset,
            certificates=certificates,
            secret=secret,
        )

    return body


def _site_frame(path: Path, columns: dict, labels: list[str] | None):
    """This site's rows, read and checked (columns, rows, and with ``labels`` the label set); errors name --site-data."""
    from keel.data.load import read_eval_file

    try:
        return read_eval_file(str(path), columns, labels)
    except KeelError as e:
        import re

        msg = re.sub(
            r"pass --(\w+)-column <one of those>", r"set data.columns.\1 in the recipe to one of those", str(e)
        )
        raise type(e)(msg.replace("--data:", "--site-data:")) from None


def join(
    recipe: Recipe,
    site_data: str,
    server: str,
    site_name: str | None = None,
    root_certificate: str | None = None,
    debug: bool = False,
    secret_file: str | None = None,
    allow_insecure: bool = False,
) -> int:
    """`keel federate join`: train on one local file for the server at ``server``; returns the rounds trained.

    The file is read and checked before the site connects, so a malformed one stops here (exit 2) and never
    holds up the federation.
    """
    from transformers import AutoTokenizer

    from keel.data.load import column_mapping
    from keel.data.prepare import tokenize_classification
    from keel.federated import transport
    from keel.models import model_dir
    from keel.recipe import DataConfig

    _fed(recipe)
    set_threads(recipe)
    path = Path(site_data).expanduser()
    if not path.is_file():
        raise KeelError(f"--site-data: file '{site_data}' not found; pass this site's CSV/JSONL/Parquet file")
    root = _read_pem(root_certificate or recipe.federated.server.root_certificate, "root certificate")
    secret = transport.load_secret(secret_file)
    transport.check_join(server, root is not None, secret, allow_insecure)
    name = site_name or path.stem
    columns = column_mapping(
        recipe.data if recipe.data.path or recipe.data.name else DataConfig(path=str(path)), "classification"
    )
    frame = _site_frame(path, columns, None)  # before connecting: a file that cannot be trained on stops here
    if recipe.data.max_train_samples:
        frame = frame[: recipe.data.max_train_samples]
    logger.info(f"site {name}: {len(frame)} rows from {path}")
    _quiet_flower(debug)
    model_path = model_dir(recipe.model.name)
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def load(labels):
        from keel.tasks import get_task

        if labels is None:
            raise KeelError("the server sent no label set; start it with `keel federate serve` from the same keel")
        checked = _site_frame(path, columns, labels)  # the server's label set is known only now
        if recipe.data.max_train_samples:
            checked = checked[: recipe.data.max_train_samples]
        ds = tokenize_classification(checked, tokenizer, recipe, labels)
        return get_task("classification").build_model(model_path, labels), tokenizer, ds

    client = make_client(name, load, site_settings(recipe))
    counted = _CountRounds(client)
    logger.info(
        f"site {name}: joining {server} ({'TLS' if root else 'insecure'}){', with the federation secret' if secret else ''}"
    )
    import grpc
    from flwr.client import start_client

    wait = float(recipe.federated.server.round_timeout or 600)
    _wait_for_server(server, wait)
    flwr_log = logging.getLogger("flwr")
    hide = _HideKeelErrors()
    if not debug:
        flwr_log.addFilter(hide)  # keel's own errors are one line below, not Flower's traceback
    try:
        with transport.site_metadata(name, secret):
            start_client(
                server_address=server,
                client=counted.to_client(),
                insecure=root is None,
                root_certificates=root,
                max_wait_time=wait,
            )
    except KeelError as e:
        raise type(e)(f"site {name}: {e}") from None
    except grpc.RpcError as e:  # grpc's errors carry a status; show it in one line
        code, detail = getattr(e, "code", lambda: None)(), getattr(e, "details", lambda: str(e))()  # noqa: F821 (the lambda runs here, inside the except)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            raise KeelError(f"site {name}: the server {server} refused this site ({detail})") from None
        raise KeelError(
            f"site {name}: lost the server {server} ({detail}); check that `keel federate serve` runs "
            f"there, then join again"
        ) from None
    finally:
        flwr_log.removeFilter(hide)
    if client.ended:
        raise KeelError(
            f"site {name}: the server ended the run after this site trained {counted.rounds} rounds: {client.ended}"
        )
    logger.info(f"site {name}: done after {counted.rounds} rounds")
    return counted.rounds


class _HideKeelErrors(logging.Filter):
    """Flower logs a client's exception with its traceback before re-raising it; keel reports its own in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], KeelError))


def _wait_for_server(server: str, timeout: float) -> None:
    """Flower's gRPC client gives up at once on a refused connection: wait here until the server listens."""
    import socket

    from keel.federated.transport import split_address

    host, port = split_address(server, "--server")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise KeelError(
                    f"no server answered at {server} for {timeout:.0f}s; start `keel federate serve` "
                    f"there first (federated.server.round_timeout sets how long a site waits)"
                ) from None
            time.sleep(1.0)


def _CountRounds(client):
    """Wrap a NumPyClient to count the rounds it trained (for the `join` summary line)."""
    fit = client.fit

    def counting_fit(parameters, config):
        out = fit(parameters, config)
        client.rounds += 1
        return out

    client.rounds = 0
    client.fit = counting_fit
    return client
