"""Console output and progress bars (rich), shared by every verb."""

from __future__ import annotations

import logging
import os
import sys
import time

from rich.console import Console
from rich.markup import MarkupError, escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

# Piped or captured output gets a wide fixed width instead of rich's 80 columns.
console = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 160)
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class RateColumn(ProgressColumn):
    """Items per second, from rich's own speed estimate."""

    def __init__(self, unit: str = "it"):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} {self.unit}/s" if speed else f"? {self.unit}/s", style="progress.data.speed")


class _LineProgress:
    """Progress for logs and pipes: a plain line at every 10% instead of a live bar."""

    def __init__(self, unit: str, disable: bool):
        self.unit, self.disable, self.tasks = unit, disable or not is_main_process(), {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, description: str, total: int, completed: int = 0, **fields) -> int:
        self.tasks[len(self.tasks)] = {
            "description": description,
            "total": max(total, 1),
            "start": time.perf_counter(),
            "first": completed,
            "next": 0.1,
        }
        return len(self.tasks) - 1

    def update(self, task_id: int, completed: int, info: str = "", **_) -> None:
        t = self.tasks[task_id]
        frac = completed / t["total"]
        elapsed = time.perf_counter() - t["start"]
        # quiet for work that finishes within a few seconds; then a line at every 10%
        if self.disable or elapsed < 3 or (frac < t["next"] and completed < t["total"]):
            return
        t["next"] = (int(frac * 10) + 1) / 10
        rate = (completed - t["first"]) / elapsed if elapsed > 0 else 0.0
        eta = (t["total"] - completed) / rate if rate > 0 else float("nan")
        console.print(
            f"{t['description']}: {completed}/{t['total']} {self.unit}s ({rate:.2f} {self.unit}/s, "
            f"elapsed {elapsed:.0f}s, eta {eta:.0f}s) {info}"
        )


def progress(unit: str = "it", disable: bool = False, transient: bool = False):
    """A live bar with count, rate, elapsed time and ETA on a terminal; plain lines otherwise.

    ``transient`` bars vanish when done (for short sub-steps such as an evaluation pass).
    """
    if not console.is_terminal:
        return _LineProgress(unit, disable)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=disable or not is_main_process(),
        transient=transient,
        refresh_per_second=4,
    )


def esc(value) -> str:
    """A string from outside (a label, a text, a file or site name, an error message) made safe to place inside
    keel's own rich markup: ``[/b]`` or ``[red]x[/red]`` in it print as typed."""
    return escape(str(value))


def safe_print(target: Console, *parts, **kwargs) -> None:
    """``target.print``, falling back to plain text if a string from outside slipped into the markup unescaped:
    a stray ``[/x]`` must not turn a finished run (or an error message) into a traceback."""
    try:
        target.print(*parts, **kwargs)
    except MarkupError:
        target.print(*parts, **{**kwargs, "markup": False})


class _NoTraceback(logging.Filter):
    """Without --debug the terminal gets the message of a ``logger.exception`` and a hint, not the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            record.msg, record.args = f"{record.getMessage()}  (run again with --debug for the traceback)", None
            record.exc_info, record.exc_text = None, None
        return True


_NO_TRACEBACK = _NoTraceback()


class _MainProcessOnly(logging.Filter):
    """Ranks other than 0 of a distributed run say only what went wrong (warnings and errors), not the progress."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or is_main_process()


def _not_serve(record: logging.LogRecord) -> bool:
    return not record.name.startswith("keel.serve")  # the server has its own handler


class _Plain(logging.Formatter):
    """``message`` for info lines, ``warning: message`` (``error: ...``) above."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever ``sys.stderr`` is when a record comes (redirected or captured alike)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _rich_handler() -> logging.Handler:
    from rich.highlighter import NullHighlighter
    from rich.logging import RichHandler

    class _Handler(RichHandler):
        """Info lines as plain text, as typed; warnings and errors marked ``warning:`` / ``error:`` in colour."""

        def render_message(self, record: logging.LogRecord, message: str):
            text = Text(message)
            if record.levelno >= logging.WARNING:
                style = "bold red" if record.levelno >= logging.ERROR else "yellow"
                text = Text.assemble((f"{record.levelname.lower()}: ", style), text)
            return text

        def render(self, *, record, traceback, message_renderable):
            return message_renderable  # no time, level or path columns: the line as console.print would print it

    return _Handler(
        console=console,
        markup=False,
        show_time=False,
        show_level=False,
        show_path=False,
        rich_tracebacks=False,
        highlighter=NullHighlighter(),
        keywords=[],
    )


def setup_logging(debug: bool = False, *, unless_configured: bool = False) -> None:
    """A handler for keel's loggers (``logging.getLogger(__name__)``): rich on a terminal, plain lines on stderr
    otherwise; messages are never parsed as markup. ``unless_configured`` (the Python API): leave alone a "keel"
    logger that the user gave handlers of their own."""
    root = logging.getLogger("keel")
    ours = [h for h in root.handlers if getattr(h, "_keel", False)]
    if unless_configured and (ours or any(not isinstance(h, logging.NullHandler) for h in root.handlers)):
        return  # set up already (by the CLI, or an earlier call), or by the user
    if not ours:
        handler = _rich_handler() if console.is_terminal else _StderrHandler()
        if not console.is_terminal:
            handler.setFormatter(_Plain())
        handler._keel = True
        handler.addFilter(_not_serve)
        handler.addFilter(_MainProcessOnly())
        root.addHandler(handler)
        ours = [handler]
    for handler in ours:
        handler.removeFilter(_NO_TRACEBACK)
        if not debug:
            handler.addFilter(_NO_TRACEBACK)
    if not unless_configured or root.level == logging.NOTSET:  # a level the user set on "keel" stays
        root.setLevel(logging.DEBUG if debug else logging.INFO)
