"""Fault script: a federation of real `keel federate serve` / `join` processes on loopback (tiny-bert, toy CSVs).

    python benchmarks/faults/federation.py

1. Two healthy sites, a site whose file has no text/label columns and a site with a label the server does not
   know join a server that needs 3 sites per round: the run must end (or complete) in bounded time, with clear
   one-line messages, never hang.
2. A stranger without the federation secret (a plain Flower client, and `keel federate join` without it) tries
   to join: it must be refused before any weights reach it.
3. `keel federate serve` on a non-loopback address without TLS, and with TLS but without a site secret: refused.
Every process is bounded; one that outlives its bound is killed and reported as hung.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OFFLINE, Row, report  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SECRET = "fault-suite-federation-secret-0123456789"
HANG = 120.0  # seconds after which a federation that has not ended counts as hung
ROUND_TIMEOUT = 45

RECIPE = """
name: fedfault
task: classification
model: {{name: tiny-bert, max_length: 32}}
data:
  path: {data}
  split: {{validation: 0.2, test: 0.2, seed: 0}}
train: {{batch_size: 8, lr: 3.0e-3, num_threads: 1}}
federated:
  sites: {sites}
  rounds: 2
  min_fit_clients: {needed}
  min_available_clients: {needed}
  server: {{address: "127.0.0.1:{port}", round_timeout: {timeout}{tls}}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toy_rows(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    good, bad = ["great", "lovely", "excellent"], ["awful", "terrible", "broken"]
    return [
        f"the ride was {rng.choice(good if i % 2 == 0 else bad)} number {i},{'pos' if i % 2 == 0 else 'neg'}"
        for i in range(n)
    ]


def write_files(tmp: Path) -> None:
    rows = toy_rows(200)
    (tmp / "toy.csv").write_text("\n".join(["text,label", *rows[:120]]) + "\n")
    (tmp / "north.csv").write_text("\n".join(["text,label", *rows[120:150]]) + "\n")
    (tmp / "south.csv").write_text("\n".join(["text,label", *rows[150:180]]) + "\n")
    (tmp / "broken.csv").write_text("\n".join(["body;stars", *(r.replace(",", ";") for r in rows[180:190])]) + "\n")
    (tmp / "odd.csv").write_text("\n".join(["text,label", *(r.replace(",neg", ",meh") for r in rows[180:200])]) + "\n")


def recipe(tmp: Path, name: str, *, sites: int, needed: int, port: int, tls: str = "") -> Path:
    p = tmp / name
    p.write_text(
        RECIPE.format(data=tmp / "toy.csv", sites=sites, needed=needed, port=port, timeout=ROUND_TIMEOUT, tls=tls)
    )
    return p


class Proc:
    """A `keel` process with its output collected; killed (its process group) if it outlives ``deadline``."""

    def __init__(self, args: list[str], cwd: Path, env: dict | None = None):
        full = {**os.environ, **OFFLINE, **(env or {})}
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(
            [sys.executable, "-m", "keel", *args],
            cwd=cwd,
            env=full,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.hung, self.seconds, self.ended_at = False, 0.0, None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        self.lines.extend(self.p.stdout)
        self.ended_at = time.monotonic()  # the output closes when the process exits

    def wait(self, deadline: float) -> Proc:
        try:
            self.p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.hung = True
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait()
        self.reader.join(timeout=5)
        self.seconds = (self.ended_at or time.monotonic()) - self.t0
        return self

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def last(self, needle: str = "") -> str:
        hits = [line.strip() for line in self.lines if needle in line]
        return (hits[-1] if hits else "")[:220]

    def outcome(self) -> str:
        if self.hung:
            return f"hung (killed after {self.seconds:.0f}s)"
        tb = ", traceback" if "Traceback" in self.text else ""
        return f"exit {self.p.returncode} after {self.seconds:.0f}s{tb}: {self.last('error') or self.last()}"


def wait_listening(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.5)
    return False


def bad_site(tmp: Path, bad: str, what: str, goal: str) -> list[Row]:
    """Two healthy sites and ``bad`` join a server that needs all 3 in every round."""
    port = free_port()
    r = recipe(tmp, f"{bad}.yaml", sites=3, needed=3, port=port)
    env = {"KEEL_FEDERATION_SECRET": SECRET}
    server = Proc(["federate", "serve", str(r)], tmp, env)
    wait_listening(port, 120)
    sites = {
        n: Proc(["federate", "join", str(r), "--site-data", f"{n}.csv", "--server", f"127.0.0.1:{port}"], tmp, env)
        for n in ("north", "south", bad)
    }
    deadline = time.monotonic() + HANG
    server.wait(deadline)
    for p in sites.values():
        p.wait(max(deadline, time.monotonic() + 20))
    b = sites[bad]
    connected = "joining" in b.text
    site_ok = not b.hung and b.p.returncode == 2 and "Traceback" not in b.text
    if bad == "broken":
        site_ok = site_ok and not connected
    rows = [
        Row(f"site {what}", goal, f"{b.outcome()}; {'it connected first' if connected else 'never connected'}", site_ok)
    ]
    ended = server.last("error") or server.last()
    rows.append(
        Row(
            "server needing 3 sites per round: 2 healthy + that site",
            "ends with a clear message naming what is missing, or completes; never hangs",
            server.outcome() if server.hung else f"exit {server.p.returncode} after {server.seconds:.0f}s: {ended}",
            not server.hung and (server.p.returncode == 0 or "needs 3 sites" in ended),
        )
    )
    healthy = [sites["north"], sites["south"]]
    said = "; ".join(f"{n}: {p.outcome()[:120]}" for n, p in zip(("north", "south"), healthy))
    rows.append(
        Row(
            "the 2 healthy sites of that run",
            "end (done, or told why), never hang",
            f"waited until the hung server was killed, then {said}" if server.hung else said,
            not server.hung and all(not p.hung for p in healthy),
        )
    )
    return rows


def bad_sites(tmp: Path) -> list[Row]:
    return bad_site(
        tmp, "broken", "with a malformed file (no text/label columns)", "one line, exit 2, before it connects"
    ) + bad_site(tmp, "odd", "whose labels the server lacks (fails at round 1)", "one line, exit 2, no traceback")


STRANGER = """
import sys, numpy as np
from flwr.client import NumPyClient, start_client
got = []
class Stranger(NumPyClient):
    def fit(self, parameters, config):
        got.append(len(parameters))
        return parameters, 1, {{}}
try:
    start_client(server_address="127.0.0.1:{port}", client=Stranger().to_client(), insecure=True, max_wait_time=20)
    print("STRANGER ended; received arrays:", got)
except Exception as e:
    print("STRANGER refused:", type(e).__name__, getattr(e, "code", lambda: "")(), "; received arrays:", got)
"""


def _secret_server(tmp: Path, name: str) -> tuple[Proc, int]:
    port = free_port()
    r = recipe(tmp, name, sites=1, needed=1, port=port)
    server = Proc(["federate", "serve", str(r)], tmp, {"KEEL_FEDERATION_SECRET": SECRET})
    wait_listening(port, 120)
    return server, port


def _stop(server: Proc) -> None:
    if server.p.poll() is None:
        os.killpg(server.p.pid, signal.SIGTERM)
    server.wait(time.monotonic() + 30)


def stranger(tmp: Path) -> list[Row]:
    server, port = _secret_server(tmp, "stranger.yaml")
    env = {**os.environ, **OFFLINE}
    env.pop("KEEL_FEDERATION_SECRET", None)
    raw = subprocess.run(
        [sys.executable, "-c", STRANGER.format(port=port)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    said = next((line for line in raw.stdout.splitlines() if line.startswith("STRANGER")), raw.stderr[-200:])
    _stop(server)
    rows = [
        Row(
            "a plain Flower client without the secret joins",
            "refused, no weights reach it",
            said[:200],
            "UNAUTHENTICATED" in said and "received arrays: []" in said,
        )
    ]
    server, port = _secret_server(tmp, "intruder.yaml")
    r = tmp / "intruder.yaml"
    site = Proc(
        [
            "federate",
            "join",
            str(r),
            "--site-data",
            "north.csv",
            "--site-name",
            "intruder",
            "--server",
            f"127.0.0.1:{port}",
        ],
        tmp,
        {"KEEL_FEDERATION_SECRET": ""},
    ).wait(time.monotonic() + 90)
    _stop(server)
    rows.append(
        Row(
            "`keel federate join` without the secret",
            "refused: one line, exit 2",
            site.outcome(),
            not site.hung and site.p.returncode == 2 and "refused this site" in site.text,
        )
    )
    return rows


def write_certificates(folder: Path) -> str:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keel fault CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    c = folder / "cert.pem"
    return f", root_certificate: {c}, certificate: {c}, private_key: {folder / 'key.pem'}"


def exposed_bind(tmp: Path) -> list[Row]:
    rows = []
    for what, tls in (("without TLS", ""), ("with TLS but no site secret", write_certificates(tmp))):
        port = free_port()
        r = recipe(tmp, "bind.yaml", sites=2, needed=2, port=port, tls=tls)
        env = {"KEEL_FEDERATION_SECRET": ""}
        p = Proc(["federate", "serve", str(r), "--address", f"0.0.0.0:{port}"], tmp, env)
        listening = False
        deadline = time.monotonic() + 90
        while p.p.poll() is None and time.monotonic() < deadline and not listening:
            listening = wait_listening(port, 1)
        if listening:
            os.killpg(p.p.pid, signal.SIGTERM)
        p.wait(time.monotonic() + 30)
        observed = f"listened on 0.0.0.0:{port}" if listening else p.outcome()
        rows.append(
            Row(
                f"`keel federate serve --address 0.0.0.0` {what}",
                "refused: one line, exit 2",
                observed,
                not listening and p.p.returncode == 2 and "refusing" in p.text,
            )
        )
    return rows


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="keel-fault-fed-") as d:
        tmp = Path(d)
        os.environ.setdefault("KEEL_CACHE_DIR", str(tmp / "cache"))
        write_files(tmp)
        rows = exposed_bind(tmp) + stranger(tmp) + bad_sites(tmp)
    report("federation", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
