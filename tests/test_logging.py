"""keel logs through the standard logging module (``logging.getLogger(__name__)`` under "keel"): a library user
configures its output the usual way; without that, keel.api prints the CLI's plain lines on stderr."""

from __future__ import annotations

import json
import logging

import pytest

TAKEN_OVER = "took over the lock of"


def _stale_lock(run_dir) -> None:
    """A lock left by a process that is gone: taking it over logs an info line naming the run directory."""
    from keel.io import LOCK

    run_dir.mkdir(parents=True)
    holder = {"pid": 2**22 + 12345, "host": "elsewhere", "command": "keel run", "since": "yesterday"}
    (run_dir / LOCK).write_text(json.dumps(holder) + "\n")


def _take_over(run_dir) -> None:
    from keel.io import acquire_run_lock, release_run_lock

    _stale_lock(run_dir)
    acquire_run_lock(run_dir)
    release_run_lock(run_dir)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def unconfigured():
    """The "keel" logger as a library user finds it after ``import keel``: its NullHandler, no level of its own
    (the session's CLI-like handler from conftest is put back afterwards)."""
    root = logging.getLogger("keel")
    handlers, level, propagate = root.handlers[:], root.level, root.propagate
    root.handlers = [h for h in handlers if not getattr(h, "_keel", False)]
    root.setLevel(logging.NOTSET)
    root.propagate = True  # as after ``import keel``, whatever an in-process CLI call in this worker left
    yield root
    root.handlers = handlers
    root.setLevel(level)
    root.propagate = propagate


def test_import_keel_adds_only_a_null_handler(unconfigured):
    assert unconfigured.handlers and all(isinstance(h, logging.NullHandler) for h in unconfigured.handlers)


def test_a_users_own_handler_gets_keels_lines_and_keel_adds_none(unconfigured, tmp_path, capsys):
    from keel.api import _default_logging

    mine = _Collect()
    unconfigured.addHandler(mine)
    unconfigured.setLevel(logging.INFO)
    _default_logging()  # what keel.run / keel.load do first
    _take_over(tmp_path / "run")
    assert [r.name for r in mine.records if TAKEN_OVER in r.getMessage()] == ["keel.io"]
    assert mine.records[0].levelno == logging.INFO
    assert not any(getattr(h, "_keel", False) for h in unconfigured.handlers)
    assert TAKEN_OVER not in capsys.readouterr().err  # the user's handler only, not keel's as well


def test_level_warning_on_the_keel_logger_silences_info_lines(unconfigured, tmp_path, capsys):
    from keel.api import _default_logging

    unconfigured.setLevel(logging.WARNING)
    _default_logging()
    _take_over(tmp_path / "run")
    logging.getLogger("keel.io").warning("still told about this")
    err = capsys.readouterr().err
    assert TAKEN_OVER not in err and "warning: still told about this" in err


def test_the_api_default_prints_plain_lines_and_other_ranks_only_warnings(unconfigured, tmp_path, capsys, monkeypatch):
    from keel.api import _default_logging

    _default_logging()
    _take_over(tmp_path / "run[/b]")
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if TAKEN_OVER in x)
    assert line.startswith(TAKEN_OVER) and "run[/b]" in line and "\\" not in line  # as typed, not markup
    monkeypatch.setenv("RANK", "1")
    _take_over(tmp_path / "other")
    logging.getLogger("keel.io").warning("a rank-1 warning")
    err = capsys.readouterr().err
    assert TAKEN_OVER not in err and "warning: a rank-1 warning" in err


def test_a_library_basicconfig_does_not_print_the_clis_lines_twice():
    """Some library in a verb calls logging.basicConfig(); the CLI's handler stays the only one printing."""
    import subprocess
    import sys

    code = (
        "import logging; from keel.cli import _root; _root(False); logging.basicConfig(); "
        "logging.getLogger('keel.x').info('printed once')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stderr.count("printed once") == 1, proc.stderr
