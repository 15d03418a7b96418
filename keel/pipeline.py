"""A run from a recipe: pick the run directory, train, evaluate on the test split, write the report.

Run directory layout (later stages add to it):

    runs/<name>/
      recipe.yaml        the resolved recipe (its SHA-256 is in run.json and every checkpoint)
      run.json           recipe hash, keel version, status, timings
      splits/            the train/validation/test rows, frozen at training time (keel/data/splits.py): every
                         later stage reads these, never data.path again
      metrics.jsonl      one record per optimiser step and per evaluation
      tensorboard/       the same metrics for TensorBoard
      checkpoints/       step-XXXXXXXX/ (exact-resume state) and best/ (best weights so far)
      model/             the final model, Hugging Face format + keel.json + manifest.json
      eval/test.json     test metrics, confusion matrix, majority-class baseline
      compress/          student/ and pruned/ (each a small run dir), deployable.json (see keel/compress)
      export/            onnx/, onnx-int8/ of the teacher; compressed stages have their own export/
      bench.json         every variant measured side by side
      report.html        one self-contained page
      .keel.lock         while a process writes to the run: its PID and command (keel.io.acquire_run_lock)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from keel import __version__
from keel.errors import KeelError
from keel.io import LOCK, acquire_run_lock, atomic_write_json, atomic_write_text, release_run_lock
from keel.progress import esc, is_main_process, log
from keel.recipe import Recipe


def check_recipe(r: Recipe) -> None:
    """The cheap checks (names, files, columns, privacy settings) that need no model loaded: `keel validate`, and
    `keel train`/`keel run` before they create a run directory, so a typo costs a second and leaves nothing behind."""
    from keel.models.registry import resolve_model

    if r.model.init == "scratch":
        from keel.pretrain import check_preset

        check_preset(r.model.name)
    else:
        resolve_model(r.model.name)
    if r.sft is not None or r.align is not None:
        from keel.align.prefs import check_source

        check_source(r)  # preference or chat JSONL: its own fields, checked when read
    else:
        from keel.data.load import check_data_config

        check_data_config(r.data, r.task)
    if r.train.privacy is not None:  # delta below 1/N, no BatchNorm, one process (keel/trust/privacy.py)
        from keel.trust.privacy import check_privacy_recipe

        check_privacy_recipe(r)


def resolve_run_dir(recipe: Recipe, resume: bool) -> Path:
    """Fresh runs never overwrite: runs/<name> or the first free runs/<name>-N. Resume takes the one the recipe
    started last (recorded in runs/.<name>.latest; a folder's mtime moves whenever `keel report` or `keel eval`
    writes into an older run)."""
    base = Path("runs") / recipe.name
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if recipe.output.dir:
        path = Path(recipe.output.dir)
    elif resume:
        path = _latest_run(recipe.name, base)
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


def _latest_run(name: str, base: Path) -> Path:
    """The run a recipe of this name started last: the recorded one, else the latest `started` in run.json."""
    try:
        recorded = base.parent / Path((base.parent / f".{name}.latest").read_text().strip()).name
        if recorded.is_dir():
            return recorded
    except OSError:
        pass
    existing = [p for p in [base, *base.parent.glob(f"{name}-*")]
                if p.is_dir() and (p == base or p.name[len(name) + 1:].isdigit())]

    def started(p: Path):
        return str(_read_json(p / "run.json").get("started", "")), 1 if p == base else int(p.name[len(name) + 1:])

    return max(existing, key=started) if existing else base


_STARTED: list[Path] = []  # run directories whose writer lock start_run took in this process


def start_run(recipe: Recipe, run_dir: Path, resume: bool) -> None:
    if not is_main_process():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    if run_dir not in _STARTED:  # one writer per run directory, until the run ends (or this process does)
        acquire_run_lock(run_dir)
        _STARTED.append(run_dir)
    if not resume and not recipe.output.dir:  # what `--resume` continues (see resolve_run_dir)
        atomic_write_text(run_dir.parent / f".{recipe.name}.latest", run_dir.name + "\n")
    atomic_write_text(run_dir / "recipe.yaml", f"# keel {__version__}, recipe sha256 {recipe.sha256()}\n" + recipe.to_yaml())
    info = _read_json(run_dir / "run.json")
    info.update({"recipe_sha256": recipe.sha256(), "keel_version": __version__, "name": recipe.name, "task": recipe.task,
                 "status": "running", "resumed": resume or info.get("resumed", False)})
    info.setdefault("started", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    atomic_write_json(run_dir / "run.json", info)


def finish_run(run_dir: Path, **fields) -> None:
    if not is_main_process():
        return
    info = _read_json(run_dir / "run.json")
    info.update(fields)
    atomic_write_json(run_dir / "run.json", info)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _ends_runs(fn):
    """The run directories ``fn`` started are unlocked when it returns or fails."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        started = len(_STARTED)
        try:
            return fn(*args, **kwargs)
        finally:
            while len(_STARTED) > started:
                release_run_lock(_STARTED.pop())

    return wrapper


@_ends_runs
def train_run(recipe: Recipe, resume: bool = False) -> Path:
    """Training only (`keel train`)."""
    check_recipe(recipe)
    return _train_run(recipe, resume)


def _train_run(recipe: Recipe, resume: bool) -> Path:
    from keel.train.engine import train

    if recipe.sft is not None or recipe.align is not None:  # one linear script, training and its figures
        from keel.align.run import generative_run

        return generative_run(recipe, resume)

    run_dir = resolve_run_dir(recipe, resume)
    log(f"run directory: [bold]{esc(run_dir)}[/]  (recipe sha256 {recipe.sha256()[:12]})")
    start_run(recipe, run_dir, resume)
    t0 = time.perf_counter()
    try:
        summary = train(recipe, run_dir, resume=resume)
    except BaseException as e:
        finish_run(run_dir, status="failed", error=f"{type(e).__name__}: {e}"[:500])
        raise
    if is_main_process():  # the environment that trained it, and the hashes of what went in
        from keel.secure.sbom import record

        record(run_dir, recipe)
    finish_run(run_dir, status="trained", train=summary, train_wall_seconds=round(time.perf_counter() - t0, 1))
    return run_dir


@_ends_runs
def full_run(recipe: Recipe, resume: bool = False) -> Path:
    """Everything the recipe asks for (`keel run`): train, test-set evaluation, compression, report."""
    from keel.evaluate import evaluate_run
    from keel.report import write_report

    check_recipe(recipe)
    if recipe.sft is not None or recipe.align is not None:  # generative fine-tuning and alignment: TRL trainers
        from keel.align.run import generative_run

        return generative_run(recipe, resume)
    t0 = time.perf_counter()
    run_dir = _train_run(recipe, resume)
    if is_main_process():
        if recipe.data.split.test > 0:
            evaluate_run(run_dir)
        else:
            log("no test split (data.split.test is 0): skipping the test evaluation")
        if recipe.task == "causal-lm":
            from keel.pretrain import write_samples

            write_samples(run_dir, recipe)
        gate_error = _audit_stage(recipe, run_dir)
        if recipe.compress is not None and gate_error is None:  # a model that failed its audit is not compressed
            from keel.compress.stages import compress

            try:
                compress(run_dir)
            except KeelError as e:  # the report still shows what was measured before the budget said no
                write_report(run_dir)
                finish_run(run_dir, status="failed", error=str(e)[:500])
                raise
        write_report(run_dir)
        if gate_error is not None:
            finish_run(run_dir, status="gate failed", error=str(gate_error)[:500],
                       wall_seconds=round(time.perf_counter() - t0, 1))
            raise gate_error
        finish_run(run_dir, status="finished", wall_seconds=round(time.perf_counter() - t0, 1))
    return run_dir


def _audit_stage(recipe: Recipe, run_dir: Path):
    """Explanations, fairness audit and model card (keel.trust); returns a failed gate instead of raising it,
    so the report is still written first."""
    from keel.errors import GateError
    from keel.trust.card import write_model_card

    if recipe.audit is None or recipe.task != "classification":
        write_model_card(run_dir)
        return None
    from keel.trust.audit import run_audit

    try:
        run_audit(run_dir)
    except GateError as e:
        return e
    return None
