"""`keel federate serve` and `keel federate join`: the server and one site as separate processes, over Flower's
gRPC (TLS when certificates are given; a site secret when the address is not loopback)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from keel.errors import KeelError
from keel.federated.common import Setup, fed_section, quiet_flower, site_settings
from keel.federated.site import make_client
from keel.recipe import Recipe
from keel.train.engine import set_threads

logger = logging.getLogger(__name__)


def _read_pem(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        raise KeelError(f"{what}: file '{path}' not found; pass the PEM file's path")
    return p.read_bytes()


def serve_rounds(
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

    fed = fed_section(recipe)
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
    quiet_flower(debug)

    def body(s: Setup, c) -> None:  # c: the run's Coordinator (keel/federated/run.py)
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

    fed_section(recipe)
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
    quiet_flower(debug)
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
