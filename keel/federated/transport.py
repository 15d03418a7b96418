"""The gRPC side of `keel federate serve` / `join`: where a server may listen, who may join, how long anyone waits.

Flower 1.41's server for separate processes (``start_server``, the grpc-bidi transport) has no node
authentication (its client logs "SuperNode authentication is not supported for this transport type"), waits up
to a day for ``min_available_clients`` and says nothing when a site goes away. keel builds the same server from
Flower's own parts (``FlowerServiceServicer``, ``generic_create_grpc_server``, ``Server``, ``run_fl``) and adds:

- a bind check: a non-loopback address needs TLS (or ``--allow-insecure``) and a site secret (or ``--allow-no-auth``);
- a shared secret ($KEEL_FEDERATION_SECRET or ``--secret-file``, never the recipe) that a site sends as gRPC
  metadata; the server compares digests in constant time and answers anyone else UNAUTHENTICATED before any
  weights travel. Over TLS the secret is never seen on the wire;
- ``SiteManager``: every wait for sites is bounded by federated.server.round_timeout, a site's arrival and
  departure are logged by name, and when too few sites remain the run ends with a message saying so (the sites
  still connected are told why, then disconnected).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import signal
import threading
from collections import namedtuple
from contextlib import contextmanager
from pathlib import Path

from flwr.server import SimpleClientManager

from keel.errors import KeelError
from keel.net import is_loopback

logger = logging.getLogger(__name__)

SECRET_ENV = "KEEL_FEDERATION_SECRET"
SECRET_HEADER = "keel-federation-secret"
SITE_HEADER = "keel-site"
END_KEY = "keel-end"  # a get_properties config key: the reason the server ends the run early
MIN_SECRET = 16


# -- addresses and secrets --------------------------------------------------------------------------


def split_address(address: str, what: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or int(port) > 65535:
        raise KeelError(f"{what} must be HOST:PORT, e.g. 127.0.0.1:9092; got {address!r}")
    return host, int(port)


def load_secret(secret_file: str | None) -> str | None:
    """The federation's shared secret from ``secret_file`` or $KEEL_FEDERATION_SECRET; None when neither is set."""
    if secret_file:
        p = Path(secret_file).expanduser()
        if not p.is_file():
            raise KeelError(
                f"--secret-file: file '{secret_file}' not found; pass the file that holds the federation secret"
            )
        value, where = p.read_text(errors="replace").strip(), f"--secret-file {secret_file}"
        if not value:
            raise KeelError(f"{where} is empty; write the federation secret into it")
    else:
        value, where = os.environ.get(SECRET_ENV, "").strip(), f"${SECRET_ENV}"
        if not value:
            return None
    if not (value.isascii() and value.isprintable()):
        raise KeelError(f"the federation secret in {where} must be printable ASCII (it travels as gRPC metadata)")
    if len(value) < MIN_SECRET:
        raise KeelError(
            f"the federation secret in {where} has {len(value)} characters, fewer than {MIN_SECRET}; "
            "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return value


def check_serve(address: str, tls: bool, secret: str | None, allow_insecure: bool, allow_no_auth: bool) -> None:
    """Refuse what would expose the federation: plain gRPC or no site secret on a non-loopback address."""
    host, _ = split_address(address, "federated.server.address (or --address)")
    if is_loopback(host):
        return
    if not tls and not allow_insecure:
        raise KeelError(
            f"refusing to serve the federation on {host} without TLS; set federated.server.root_certificate, "
            "certificate and private_key, or pass --allow-insecure if the network is trusted"
        )
    if not secret and not allow_no_auth:
        raise KeelError(
            f"refusing to serve the federation on {host} without a site secret (anyone could join); set "
            f"{SECRET_ENV} or --secret-file, or pass --allow-no-auth if the network is trusted"
        )


def check_join(server: str, tls: bool, secret: str | None, allow_insecure: bool) -> None:
    host, _ = split_address(server, "--server")
    if is_loopback(host) or tls:
        return
    if secret:
        raise KeelError(
            f"refusing to send the federation secret to {host} in clear text; pass --root-certificate "
            "(the server's CA, PEM) so that the site talks TLS"
        )
    if not allow_insecure:
        raise KeelError(
            f"refusing to send this site's updates to {host} without TLS; pass --root-certificate, or "
            "--allow-insecure if the network is trusted"
        )


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


# -- the server ---------------------------------------------------------------------------------------


class TooFewSites(KeelError):
    """Fewer sites than a round needs stayed connected for federated.server.round_timeout."""

    def __init__(self, message: str, for_sites: str = ""):
        super().__init__(message)
        self.for_sites = for_sites or message


def _server_interceptor(secret: str):
    import grpc

    want = _digest(secret)

    def deny(request_iterator, context):
        logger.warning(f"refused a site from {context.peer()}: no or wrong federation secret")
        context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "no or wrong federation secret; set KEEL_FEDERATION_SECRET or --secret-file to the federation's secret",
        )

    class SecretCheck(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            sent = dict(details.invocation_metadata or ()).get(SECRET_HEADER, "")
            if isinstance(sent, str) and hmac.compare_digest(_digest(sent), want):
                return continuation(details)
            return grpc.stream_stream_rpc_method_handler(deny)

    return SecretCheck()


def _site_name(raw) -> str | None:
    """A site's self-reported name, for logs only: printable ASCII, at most 64 characters."""
    if not isinstance(raw, str):
        return None
    name = "".join(ch for ch in raw if ch.isascii() and ch.isprintable())[:64].strip()
    return name or None


class SiteManager(SimpleClientManager):
    """Flower's SimpleClientManager with named sites and waits bounded by federated.server.round_timeout."""

    def __init__(self, wait_s: float, needed: int, offset: int):
        super().__init__()
        self.wait_s, self.needed, self.round = float(wait_s), needed, offset
        self.names: dict[str, str] = {}
        self.left: list[tuple[str, int]] = []
        self.local = threading.local()  # the joining site's name, set by the servicer on the same thread
        self.closing = False

    def register(self, client) -> bool:
        name = getattr(self.local, "site", None) or f"site-{client.cid[:8]}"
        if not super().register(client):
            return False
        self.names[client.cid] = name
        logger.info(f"site {name} joined ({len(self)} connected; rounds need {self.needed})")
        return True

    def unregister(self, client) -> None:
        if client.cid not in self.clients:
            return
        super().unregister(client)
        if not self.closing:
            name = self.names.get(client.cid, client.cid)
            self.left.append((name, self.round))
            logger.warning(
                f"site {name} left during round {self.round} ({len(self)} connected; rounds need {self.needed})"
            )

    def sample(self, num_clients, min_num_clients=None, criterion=None):
        self.round += 1  # Flower samples once per round (configure_fit)
        return super().sample(num_clients, min_num_clients, criterion)

    def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
        if super().wait_for(num_clients, timeout=min(float(timeout), self.wait_s)):
            return True
        raise TooFewSites(self.too_few(num_clients), self.too_few(num_clients, for_sites=True))

    def too_few(self, num_clients: int, for_sites: bool = False) -> str:
        """Why the run ends; the sites' version names no other site."""
        now = f"{len(self)} {'is' if len(self) == 1 else 'are'} connected" if self.names else "no site joined"
        head = (
            f"round {self.round} needs {num_clients} sites (federated.min_available_clients) but {now} after "
            f"waiting {self.wait_s:g}s (federated.server.round_timeout)"
        )
        if for_sites:
            return f"{head}; join again when the server resumes the run"
        gone = ", ".join(f"{n} (round {r})" for n, r in self.left)
        return (
            f"{head}{'; sites that left: ' + gone if gone else ''}. The completed rounds are saved: fix the "
            f"sites, then `keel federate serve RECIPE --resume` and join them again"
        )


def _servicer(manager):
    from flwr.server.superlink.fleet.grpc_bidi.flower_service_servicer import FlowerServiceServicer

    class Servicer(FlowerServiceServicer):
        def Join(self, request_iterator, context):  # noqa: N802 (gRPC's name)
            # The generator below runs on the gRPC worker thread that registers the site: hand it the name.
            manager.local.site = _site_name(dict(context.invocation_metadata() or ()).get(SITE_HEADER))
            yield from super().Join(request_iterator, context)

    return Servicer(manager)


def _tell_sites(manager, reason: str) -> None:
    """Give each connected site the reason the run ends (a keel site logs it and exits 2), bounded in time."""
    from concurrent.futures import ThreadPoolExecutor

    from flwr.common import GetPropertiesIns

    def tell(proxy):
        try:
            proxy.get_properties(GetPropertiesIns(config={END_KEY: reason}), timeout=10, group_id=None)
        except Exception:  # a site that cannot be told is disconnected all the same
            logger.debug("could not tell site %s why the run ends", proxy.cid, exc_info=True)

    clients = list(manager.all().values())
    if clients:
        with ThreadPoolExecutor(max_workers=min(32, len(clients))) as pool:
            list(pool.map(tell, clients))


def run_server(
    address: str,
    strategy,
    *,
    num_rounds: int,
    round_timeout: float | None,
    needed: int,
    offset: int,
    certificates: tuple[bytes, bytes, bytes] | None,
    secret: str | None,
) -> None:
    """Flower's ``start_server``, from its own parts, with the secret check and the bounded waits."""
    from flwr.proto.transport_pb2_grpc import add_FlowerServiceServicer_to_server
    from flwr.server import Server, ServerConfig
    from flwr.server.server import run_fl
    from flwr.supercore.address import is_port_in_use
    from flwr.supercore.grpc import generic_create_grpc_server

    wait = float(round_timeout or 600)
    manager = SiteManager(wait, needed, offset)
    server = Server(client_manager=manager, strategy=strategy)
    if is_port_in_use(address):
        raise KeelError(
            f"port of {address} is in use; stop what listens there or set federated.server.address / --address"
        )
    try:
        grpc_server = generic_create_grpc_server(
            servicer_and_add_fn=(_servicer(manager), add_FlowerServiceServicer_to_server),
            server_address=address,
            certificates=certificates,
            interceptors=[_server_interceptor(secret)] if secret else None,
        )
    except RuntimeError as e:  # grpc could not bind
        raise KeelError(f"cannot listen on {address} ({e}); check federated.server.address / --address") from None
    grpc_server.start()
    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM ends the run like Ctrl-C: marked, resumable
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        run_fl(server=server, config=ServerConfig(num_rounds=num_rounds, round_timeout=round_timeout))
    except TooFewSites as e:  # the CLI prints the reason; the sites still connected hear it first
        manager.closing = True
        _tell_sites(manager, e.for_sites)
        server.disconnect_all_clients(timeout=10)
        raise
    finally:
        manager.closing = True
        grpc_server.stop(grace=1)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


# -- the site -----------------------------------------------------------------------------------------

_Details = namedtuple("_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"))


def _client_interceptor(pairs: list[tuple[str, str]]):
    import grpc

    class Details(_Details, grpc.ClientCallDetails):
        pass

    class AddMetadata(grpc.StreamStreamClientInterceptor, grpc.UnaryUnaryClientInterceptor):
        def _details(self, d):
            return Details(
                d.method,
                d.timeout,
                [*(d.metadata or ()), *pairs],
                d.credentials,
                getattr(d, "wait_for_ready", None),
                getattr(d, "compression", None),
            )

        def intercept_stream_stream(self, continuation, details, request_iterator):
            return continuation(self._details(details), request_iterator)

        def intercept_unary_unary(self, continuation, details, request):
            return continuation(self._details(details), request)

    return AddMetadata()


@contextmanager
def site_metadata(site: str, secret: str | None):
    """While Flower's client connects, its gRPC channel carries the site's name and the federation secret.

    Flower 1.41's ``start_client`` takes no call metadata or interceptors for its grpc-bidi transport, but the
    channel comes from ``create_channel(..., interceptors=None)``: keel passes its interceptor there.
    """
    from flwr.compat.client.grpc_client import connection

    pairs = [(SITE_HEADER, _site_name(site) or "site")] + ([(SECRET_HEADER, secret)] if secret else [])
    original = connection.create_channel

    def create_channel(*args, **kwargs):
        kwargs["interceptors"] = [*(kwargs.get("interceptors") or ()), _client_interceptor(pairs)]
        return original(*args, **kwargs)

    connection.create_channel = create_channel
    try:
        yield
    finally:
        connection.create_channel = original
