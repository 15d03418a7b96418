"""Console output and progress bars (rich), shared by every verb."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
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


def progress(unit: str = "it", disable: bool = False) -> Progress:
    """A bar with count, rate, elapsed time and ETA. Off on non-main ranks."""
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
        transient=not sys.stderr.isatty(),
        refresh_per_second=4,
    )


def log(message: str) -> None:
    if is_main_process():
        console.print(message)
