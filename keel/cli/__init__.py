"""The `keel` command. Heavy libraries are imported inside each verb, so `keel validate` stays fast.

Each verb module registers its commands on the shared app (keel/cli/_app.py); importing them here, in the
order `keel --help` lists them, is what makes them part of the command.

Exit codes: 0 ok, 2 bad input (one line, no traceback unless --debug), 3 a quality gate failed,
1 an unexpected error.
"""

from __future__ import annotations

import importlib
import sys

from keel.cli._app import _root, app, optional_ray_address
from keel.cli.results import example_text as _example_text
from keel.errors import KeelError
from keel.progress import console, esc, safe_print

__all__ = ["app", "main", "_root", "_example_text"]

# the verb modules, in the order `keel --help` lists their commands; a new module of verbs is one more name here
VERB_MODULES = ("core", "data", "fewshot", "compress", "trust", "label", "federate", "serve", "ui", "learn", "secure")
for _name in VERB_MODULES:
    importlib.import_module(f"keel.cli.{_name}")


def main() -> None:
    args = sys.argv[1:]
    debug = "--debug" in args
    if debug:  # accepted anywhere on the line, not only before the verb
        args = ["--debug", *[a for a in args if a != "--debug"]]
    args = optional_ray_address(args)
    try:
        if app(args=args, prog_name="keel", standalone_mode=False) == 130:
            raise KeyboardInterrupt  # typer returns Ctrl-C as exit code 130 when not standalone: not a success
    except KeelError as e:
        if debug:
            raise
        safe_print(console, f"[red]error:[/] {esc(e)}", soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]; the last complete checkpoint is kept (resume with --resume)")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        if debug:
            raise
        safe_print(
            console,
            f"[red]error:[/] unexpected {type(e).__name__}: {esc(e)}  (run again with --debug for the traceback)",
            soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
