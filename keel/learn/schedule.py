"""`keel serve RUN --learn`: learn rounds on a schedule while the server serves.

Every ``learn.every`` the server counts the feedback rows that arrived since the last round (the newest row any
decision read, else the last promotion's); with at least ``learn.min_feedback`` of the kinds the run learns from
(classifiers: label; causal LMs: thumbs and preference), it runs `keel learn RUN` in a child process at a lower
CPU priority, so serving is never blocked by training. A promotion reaches the server through learn/state.json,
which the server's version watcher swaps in (keel/serve/app.py). A round that fails (a non-zero exit) is logged and
recorded as a ``failed`` decision with its error line; the server keeps serving and tries again once
``min_feedback`` more rows have arrived.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from keel import rundir
from keel.errors import KeelError
from keel.io import read_json, writes_run
from keel.learn.record import next_round, now, write_decision

logger = logging.getLogger(__name__)

DEFAULT_EVERY_S = 1800.0
KINDS = {"classification": ("label",), "causal-lm": ("thumbs", "preference")}


@dataclass
class Schedule:
    run_dir: Path
    every_s: float
    min_feedback: int
    kinds: tuple[str, ...]
    rounds: list[dict] = field(default_factory=list)  # what each scheduled round ended with (for logs and tests)


def schedule_for(run_dir: str | Path, every: str | None = None) -> Schedule:
    """The run's ``learn:`` schedule, ``every`` (``--learn-every``) overriding ``learn.every``; KeelError when the
    run cannot learn while served."""
    from keel.recipe import load_recipe
    from keel.recipe.learn import LearnConfig, duration_seconds

    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file() or not (run_dir / "model" / "keel.json").is_file():
        raise KeelError(f"--learn needs a trained run directory to learn into; {run_dir} is not one")
    recipe = load_recipe(run_dir / "recipe.yaml")
    if recipe.task not in KINDS:
        raise KeelError(f"--learn: keel learn learns classifiers and causal LMs; {run_dir} is a {recipe.task} run")
    cfg = recipe.learn or LearnConfig()
    try:
        seconds = duration_seconds(every, "--learn-every") if every is not None else cfg.every or DEFAULT_EVERY_S
    except ValueError as e:
        raise KeelError(str(e)) from None
    return Schedule(run_dir, seconds, cfg.min_feedback, KINDS[recipe.task])


def check_serving(config) -> None:
    """--learn only makes sense when feedback is stored with its texts and promotions are swapped in."""
    fb = config.feedback
    if not fb.enabled or not fb.store_text:
        raise KeelError(
            "--learn learns from the feedback's texts; set serve.feedback.enabled: true and "
            "serve.feedback.store_text: true (e.g. --set serve.feedback.store_text=true)"
        )
    if fb.poll_s <= 0:
        raise KeelError("--learn promotes versions the server must swap in; set serve.feedback.poll_s above 0")


def last_read(run_dir: Path) -> int:
    """The newest feedback row id a round has read (any decision), else the last promotion's."""
    seen = rundir.learn_state(run_dir)["learned_through"]
    folder = rundir.decisions_dir(run_dir)
    for path in folder.glob("[0-9]*.json") if folder.is_dir() else []:
        seen = max(seen, int((read_json(path).get("data") or {}).get("feedback_through_id") or 0))
    return seen


def new_rows(run_dir: Path, kinds: tuple[str, ...]) -> tuple[int, int]:
    """(how many rows of ``kinds`` arrived since the last round, the newest row id)."""
    from keel.serve.feedback import count_rows

    return count_rows(rundir.feedback_db(run_dir), last_read(run_dir), kinds)


@writes_run
def record_failure(run_dir: Path, why: str, through_id: int) -> dict:
    """A ``failed`` decision: the round's error line, and the feedback it would have read."""
    decision = {
        "round": next_round(run_dir),
        "time": now(),
        "action": "failed",
        "why": why,
        "champion": rundir.current_version(run_dir),
        "data": {"feedback_through_id": through_id},
    }
    decision["file"] = str(write_decision(run_dir, decision))
    return decision


def _command(run_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "keel", "learn", str(run_dir)]
    nice = shutil.which("nice")
    return [nice, "-n", "10", *cmd] if nice else cmd  # the server's requests go first


async def run_round(schedule: Schedule, through_id: int) -> dict:
    """`keel learn RUN` in a child process; its outcome (a failure recorded as a decision)."""
    loop = asyncio.get_running_loop()
    proc = await asyncio.create_subprocess_exec(
        *_command(schedule.run_dir), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await proc.communicate()
    except asyncio.CancelledError:  # the server is stopping: so does its round (nothing half-written: atomic)
        proc.terminate()
        await proc.wait()
        raise
    if proc.returncode == 0:
        line = next((x for x in out.decode(errors="replace").splitlines() if x.strip()), "")
        logger.info("learn round: %s", line)
        return {"ok": True, "line": line}
    lines = [x for x in err.decode(errors="replace").splitlines() if x.strip()]
    why = f"`keel learn` exited {proc.returncode}: " + (lines[-1] if lines else "no error message")
    logger.error("learn round failed (the server keeps serving): %s", why)
    try:
        await loop.run_in_executor(None, record_failure, schedule.run_dir, why[:500], through_id)
    except Exception:
        logger.exception("could not record the failed learn round")
    return {"ok": False, "why": why}


async def run_schedule(schedule: Schedule) -> None:
    """Forever: wait ``every_s``, then run a round when enough new feedback has arrived."""
    loop = asyncio.get_running_loop()
    logger.info(
        "learning every %.0fs once %d new feedback row(s) have arrived", schedule.every_s, schedule.min_feedback
    )
    while True:
        await asyncio.sleep(schedule.every_s)
        try:
            n, through_id = await loop.run_in_executor(None, new_rows, schedule.run_dir, schedule.kinds)
            if n < schedule.min_feedback:
                continue
            logger.info("learn round: %d new feedback row(s)", n)
            schedule.rounds.append(await run_round(schedule, through_id))
        except asyncio.CancelledError:
            raise
        except Exception:  # the schedule outlives any one round
            logger.exception("learn round could not run; the server keeps serving")
