"""`keel federate`: simulate every site here, or run the server and the sites as separate processes."""

from __future__ import annotations

import typer

from keel.cli._app import app, load, state
from keel.cli.results import print_results
from keel.errors import KeelError


@app.command(
    help="Federated learning with Flower. `keel federate RECIPE` simulates every site on this machine; "
    "`keel federate serve RECIPE` runs the server and `keel federate join RECIPE --site-data FILE "
    "--server HOST:PORT` one site, as separate processes."
)
def federate(
    args: list[str] = typer.Argument(..., metavar="[serve|join] RECIPE [key.path=value ...]"),
    resume: bool = typer.Option(False, "--resume", help="continue after the last completed round"),
    site_data: str | None = typer.Option(None, "--site-data", help="join: this site's labelled file"),
    server: str | None = typer.Option(None, "--server", help="join: the server's HOST:PORT"),
    site_name: str | None = typer.Option(
        None, "--site-name", help="join: the name the server logs (default: the file's name)"
    ),
    root_certificate: str | None = typer.Option(None, "--root-certificate", help="join: CA certificate (PEM) for TLS"),
    address: str | None = typer.Option(
        None, "--address", help="serve: HOST:PORT to listen on (default federated.server.address)"
    ),
    secret_file: str | None = typer.Option(
        None, "--secret-file", help="serve/join: file with the federation's site secret (or set KEEL_FEDERATION_SECRET)"
    ),
    allow_insecure: bool = typer.Option(
        False, "--allow-insecure", help="serve/join: plain gRPC on a non-loopback address"
    ),
    allow_no_auth: bool = typer.Option(
        False, "--allow-no-auth", help="serve: a non-loopback address without a site secret"
    ),
) -> None:
    mode = args[0] if args[0] in ("serve", "join") else "simulate"
    rest = args[1:] if mode != "simulate" else args
    if not rest:
        raise KeelError(f"keel federate {mode}: pass a recipe, e.g. keel federate {mode} federated")
    r = load(rest[0], rest[1:])
    if mode == "join":
        if not site_data or not server:
            raise KeelError("keel federate join needs --site-data FILE and --server HOST:PORT")
        from keel.federated.remote import join

        join(
            r,
            site_data,
            server,
            site_name,
            root_certificate,
            debug=state["debug"],
            secret_file=secret_file,
            allow_insecure=allow_insecure,
        )
        return
    if site_data or server:
        raise KeelError("--site-data and --server go with `keel federate join`")
    from keel.pipeline import federate as run_federated

    if mode == "serve":
        run_dir = run_federated(
            r,
            "serve",
            resume=resume,
            address=address,
            debug=state["debug"],
            secret_file=secret_file,
            allow_insecure=allow_insecure,
            allow_no_auth=allow_no_auth,
        )
    else:
        run_dir = run_federated(r, "simulate", resume=resume, debug=state["debug"])
    print_results(run_dir)
