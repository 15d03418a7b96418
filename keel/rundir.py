"""The run directory: its layout, its lifecycle, and where each variant of its model lives.

Every part of keel that writes or reads a run asks this module where things are; it imports nothing of keel
but errors, io, recipe and progress, so anything may import it.

    runs/<name>/
      recipe.yaml        the resolved recipe (its SHA-256 is in run.json and every checkpoint)
      run.json           recipe hash, keel version, status (running, trained, finished, failed, gate failed), timings
      splits/            the train/validation/test rows, frozen at training time (keel/data/splits.py): every
                         later stage reads these, never data.path again
      metrics.jsonl      one record per optimiser step and per evaluation
      tensorboard/       the same metrics for TensorBoard
      checkpoints/       step-XXXXXXXX/ (exact-resume state) and best/ (best weights so far)
      federated/         round-XXXXX/ checkpoints of a federated run (what --resume continues from)
      model/             the final model, Hugging Face format + keel.json + manifest.json
      eval/test.json     test metrics, confusion matrix, majority-class baseline
      compress/          student/ and pruned/ (each a small run dir: model/ recipe.yaml metrics.jsonl train.json
                         [export/onnx*/]), deployable.json (the variant picked within compress.budget)
      export/            onnx/, onnx-int8/, onnx-static-int8/ of the teacher; compressed stages have their own export/
      bench.json         every variant measured side by side
      report.html        one self-contained page
      feedback/          feedback.sqlite (append-only, WAL): what `POST /v1/feedback` acknowledged (keel/serve/feedback.py)
      learn/             `keel learn`: v0001/, v0002/, ... (each a small run dir: model/ recipe.yaml splits/ train.json),
                         decisions/NNNN.json (every promotion, refusal and rollback: why, figures), state.json (the
                         version served now, the promoted history, the feedback already learned from)
      .keel.lock         while a process writes to the run: its PID and command (keel.io.acquire_run_lock)

A variant is ``<stage>-<backend>`` (``pruned-onnx-int8``); the legacy names ``torch``, ``onnx``, ``onnx-int8``,
``onnx-static-int8`` and ``torchao-*`` are the teacher's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from keel._version import __version__
from keel.errors import KeelError
from keel.io import LOCK, acquire_run_lock, atomic_write_json, atomic_write_text, read_json, release_run_lock
from keel.progress import is_main_process
from keel.recipe import Recipe

logger = logging.getLogger(__name__)

SPLITS = "splits"  # the frozen splits (keel/data/splits.py)
ROUNDS = "federated"  # a federated run's round checkpoints
STAGES = ("student", "pruned")  # the compression stages, in order; the teacher is the run itself
FEEDBACK = "feedback"  # the server's feedback database
LEARN = "learn"  # `keel learn`: model versions side by side, decisions, state.json
BASE_VERSION = "base"  # the run's own model/, before any promotion


# -- layout --------------------------------------------------------------------------------------------


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) if stage == "teacher" else Path(run_dir) / "compress" / stage


def latest_stage(run_dir: str | Path) -> str:
    """The last compression stage with a sealed model, else ``teacher``."""
    for stage in reversed(STAGES):
        if (stage_dir(run_dir, stage) / "model" / "manifest.json").is_file():
            return stage
    return "teacher"


def export_dir(run_dir: str | Path, variant: str) -> Path:
    """Where a stage's ONNX export ``variant`` (onnx, onnx-int8, onnx-static-int8) lives."""
    return Path(run_dir) / "export" / variant


def splits_dir(run_dir: str | Path) -> Path | None:
    """The sealed splits folder of ``run_dir``, or of the run a compression stage belongs to; None if absent."""
    run_dir = Path(run_dir)
    candidates = [run_dir]
    if run_dir.parent.name == "compress":  # compress/<stage>/ or the scratch folder it is trained in
        candidates.append(run_dir.parent.parent)
    for d in candidates:
        if (d / SPLITS / "splits.json").is_file():
            return d / SPLITS
    return None


def variant_location(run_dir: str | Path, variant: str) -> tuple[Path, str]:
    """A variant name -> (the stage's run folder, the backend). Legacy names (torch, onnx, onnx-int8) are the teacher's."""
    if variant in ("torch", "onnx", "onnx-int8", "onnx-static-int8") or variant.startswith("torchao-"):
        return Path(run_dir), variant
    stage, _, backend = variant.partition("-")
    if stage not in ("teacher", *STAGES) or not backend:
        raise KeelError(
            f"--backend must be one of torch, onnx, onnx-int8, onnx-static-int8, torchao-weight-only, "
            f"torchao-dynamic, or a variant <stage>-<backend> with stage teacher, student or pruned "
            f"(see `keel bench`); got {variant!r}"
        )
    return stage_dir(run_dir, stage), backend


def torch_twin(variant: str) -> str:
    """The PyTorch variant a quantized or exported one was made from (``pruned-onnx-int8`` -> ``pruned-torch``)."""
    for suffix in ("onnx-static-int8", "onnx-int8", "onnx", "torchao-weight-only", "torchao-dynamic"):
        if variant.endswith(suffix):
            return variant[: -len(suffix)] + "torch"
    return variant


def deployable_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / "compress" / "deployable.json"


def deployable(run_dir: str | Path) -> dict | None:
    """The budgeted pick `keel compress` wrote (keel/compress/budget.py), or None."""
    path = deployable_file(run_dir)
    return json.loads(path.read_text()) if path.is_file() else None


def serve_variant(run_dir: str | Path, backend: str = "auto") -> str:
    """The variant ``auto`` means for predict/serve: the deployable one, else the teacher's onnx-int8, onnx, torch."""
    if backend != "auto":
        return backend
    picked = (deployable(run_dir) or {}).get("deployable")
    if picked:  # the variant `keel compress` measured and chose within its budget
        return picked
    for name in ("onnx-int8", "onnx"):
        if (export_dir(run_dir, name) / "manifest.json").is_file():
            return name
    return "torch"


def feedback_db(run_dir: str | Path) -> Path:
    return Path(run_dir) / FEEDBACK / "feedback.sqlite"


def learn_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / LEARN


def learn_state_file(run_dir: str | Path) -> Path:
    """What a server polls to notice a promotion or a rollback (written atomically by `keel learn`)."""
    return learn_dir(run_dir) / "state.json"


def learn_state(run_dir: str | Path) -> dict:
    """``{"current": version, "history": [promoted versions, oldest first], "learned_through": feedback row id}``."""
    state = read_json(learn_state_file(run_dir))
    state.setdefault("current", BASE_VERSION)
    state.setdefault("history", [BASE_VERSION])
    state.setdefault("learned_through", 0)
    return state


def version_name(n: int) -> str:
    return f"v{n:04d}"


def version_dir(run_dir: str | Path, version: str) -> Path:
    """The run folder of a model version: the run itself for ``base``, else learn/<version>/."""
    return Path(run_dir) if version == BASE_VERSION else learn_dir(run_dir) / version


def current_version(run_dir: str | Path) -> str:
    return learn_state(run_dir)["current"]


def decisions_dir(run_dir: str | Path) -> Path:
    return learn_dir(run_dir) / "decisions"


# -- lifecycle -----------------------------------------------------------------------------------------


def resolve(recipe: Recipe, resume: bool) -> Path:
    """Fresh runs never overwrite: runs/<name> or the first free runs/<name>-N. Resume takes the one the recipe
    started last (recorded in runs/.<name>.latest; a folder's mtime moves whenever `keel report` or `keel eval`
    writes into an older run)."""
    base = Path("runs") / recipe.name
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if recipe.output.dir:
        path = Path(recipe.output.dir)
    elif resume:
        path = latest_run(recipe.name, base)
    elif distributed:
        path = base  # every process must agree on the folder without talking
    else:
        path, n = base, 2
        while path.exists():
            path, n = base.parent / f"{recipe.name}-{n}", n + 1
    if resume:
        if not path.is_dir():
            raise KeelError(f"nothing to resume: {path} does not exist; run without --resume")
    elif is_main_process() and path.is_dir() and any(p.name != LOCK for p in path.iterdir()):
        raise KeelError(f"{path} already holds a run; pass --resume to continue it, or set output.dir to a new folder")
    return path


def latest_run(name: str, base: Path) -> Path:
    """The run a recipe of this name started last: the recorded one, else the latest `started` in run.json."""
    try:
        recorded = base.parent / Path((base.parent / f".{name}.latest").read_text().strip()).name
        if recorded.is_dir():
            return recorded
    except OSError:
        pass
    existing = [
        p
        for p in [base, *base.parent.glob(f"{name}-*")]
        if p.is_dir() and (p == base or p.name[len(name) + 1 :].isdigit())
    ]

    def started(p: Path):
        return str(read_json(p / "run.json").get("started", "")), 1 if p == base else int(p.name[len(name) + 1 :])

    return max(existing, key=started) if existing else base


def start(recipe: Recipe, run_dir: Path, resume: bool) -> None:
    """recipe.yaml, run.json (status running) and what `--resume` continues; the caller holds the lock."""
    if not is_main_process():
        return
    if not resume and not recipe.output.dir:  # what `--resume` continues (see resolve)
        atomic_write_text(run_dir.parent / f".{recipe.name}.latest", run_dir.name + "\n")
    atomic_write_text(
        run_dir / "recipe.yaml", f"# keel {__version__}, recipe sha256 {recipe.sha256()}\n" + recipe.to_yaml()
    )
    info = read_json(run_dir / "run.json")
    info.update(
        {
            "recipe_sha256": recipe.sha256(),
            "keel_version": __version__,
            "name": recipe.name,
            "task": recipe.task,
            "status": "running",
            "resumed": resume or info.get("resumed", False),
        }
    )
    info.setdefault("started", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    atomic_write_json(run_dir / "run.json", info)


def record(run_dir: Path, **fields) -> None:
    """Merge ``fields`` into run.json (main process only)."""
    if not is_main_process():
        return
    info = read_json(run_dir / "run.json")
    info.update(fields)
    atomic_write_json(run_dir / "run.json", info)


class Run:
    """A started run: its folder and the run.json updates of its lifecycle (see ``lifecycle``)."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir
        self.t0 = time.perf_counter()
        self.ended = False  # a failure the run recorded itself (gate failed, budget refused) is kept as written

    def seconds(self) -> float:
        return round(time.perf_counter() - self.t0, 1)

    def trained(self, summary: dict, **fields) -> None:
        record(self.dir, status="trained", train=summary, **fields)

    def fail(self, error: str | BaseException, status: str = "failed", **fields) -> None:
        if isinstance(error, BaseException):
            error = f"{type(error).__name__}: {error}"
        record(self.dir, status=status, error=str(error)[:500], **fields)
        self.ended = True

    def finish(self) -> None:
        record(self.dir, status="finished", wall_seconds=self.seconds())
        self.ended = True


@contextlib.contextmanager
def lifecycle(recipe: Recipe, resume: bool) -> Iterator[Run]:
    """Pick the run directory, take its writer lock, mark it running; on any error (Ctrl-C included) mark it
    failed and re-raise; release the lock when the block ends. The block calls ``run.finish()`` when done."""
    run_dir = resolve(recipe, resume)
    logger.info(f"run directory: {run_dir}  (recipe sha256 {recipe.sha256()[:12]})")
    locked = is_main_process()
    if locked:  # one writer per run directory, until the run ends (or this process does)
        run_dir.mkdir(parents=True, exist_ok=True)
        acquire_run_lock(run_dir)
    try:
        start(recipe, run_dir, resume)
        run = Run(run_dir)
        try:
            yield run
        except BaseException as e:
            if not run.ended:
                run.fail(e)
            raise
    finally:
        if locked:
            release_run_lock(run_dir)
