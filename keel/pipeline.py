"""`keel run` / `keel train` / `keel federate`: the one dispatcher from a recipe to its trainer and later stages.

Every kind of training is a ``Trainer`` (torchtune's recipe interface: setup, train, save, cleanup), picked from
``TRAINERS`` by what the recipe asks for and driven here inside the run's lifecycle (keel/rundir.py: the run
directory, its lock, run.json's status, failed on any error). Then the stages that follow training, in order:
test evaluation, samples (causal LM), audit and model card, compression, report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from keel import rundir
from keel.errors import KeelError
from keel.progress import is_main_process
from keel.recipe import Recipe

logger = logging.getLogger(__name__)


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

        check_data_config(r.data, r.task, content=True)  # the rows too: empty, one label, bad bytes, bad lines
    if r.data.augment is not None or r.data.weak is not None:  # classification only; the LF file compiles
        from keel.data.weak import check_enrichment

        check_enrichment(r)
    if r.audit is not None and r.task == "classification":  # lexicon categories, the group column, baseline_run
        from keel.trust.lexicon import check_audit_recipe

        check_audit_recipe(r)
    if r.compress is not None:  # what `keel run` does with the section (the stage verbs take it on any run)
        from keel.compress.budget import check_compress_recipe

        check_compress_recipe(r)
    if r.data.curate is not None:  # the task, the libraries and the probe's model (keel/data/curate)
        from keel.data.curate.steps import check_curate_recipe

        check_curate_recipe(r)
    if r.train.privacy is not None:  # delta below 1/N, no BatchNorm, one process (keel/trust/privacy.py)
        from keel.trust.privacy import check_privacy_recipe

        check_privacy_recipe(r)


class Trainer(Protocol):
    """One way of training a recipe. Its constructor takes ``(recipe, resume, **options)`` and makes the cheap
    checks (nothing is on disk yet); then, inside the run's lifecycle, ``setup`` (data, model), ``train``,
    ``save`` (the sealed final model in RUN/model; returns the training summary for run.json), and ``cleanup``
    always. No base class: each trainer is a small class over library calls."""

    resumable: bool  # whether --resume can continue an interrupted run

    def setup(self, run_dir: Path) -> None: ...

    def train(self) -> None: ...

    def save(self) -> dict: ...

    def cleanup(self) -> None: ...


class EngineTrainer:
    """keel's own loop (keel/train/engine.py): classifiers, causal LMs, pretraining from scratch (model.init),
    DP-SGD (train.privacy). Exact resume from the last complete checkpoint."""

    resumable = True

    def __init__(self, recipe: Recipe, resume: bool = False):
        self.recipe, self.resume = recipe, resume
        if resume:  # a recipe the checkpoint cannot continue with is refused before run.json says "running"
            from keel.train.engine import check_resumable

            check_resumable(rundir.resolve(recipe, resume), recipe)

    def setup(self, run_dir: Path) -> None:
        self.run_dir = run_dir  # the engine builds data and model itself (shared with DP-SGD and compression)

    def train(self) -> None:
        from keel.train.engine import train

        self.summary = train(self.recipe, self.run_dir, resume=self.resume)

    def save(self) -> dict:
        if is_main_process():  # the engine sealed RUN/model; now the environment that trained it, and the hashes
            from keel.secure.sbom import record  # of what went in (keel/secure/sbom.py)

            record(self.run_dir, self.recipe)
        return self.summary

    def cleanup(self) -> None:
        pass


def _engine():
    return EngineTrainer


def _sft():
    from keel.sft import SftTrainer

    return SftTrainer


def _align():
    from keel.align.run import AlignTrainer

    return AlignTrainer


def _federated():
    from keel.federated.run import FederatedTrainer

    return FederatedTrainer


TRAINERS: dict[str, Callable[[], type]] = {
    "engine": _engine,
    "pretrain": _engine,
    "sft": _sft,
    "align": _align,
    "federated": _federated,
}  # name -> the trainer class, imported on use


def trainer_kind(recipe: Recipe) -> str:
    """What the recipe asks for, as a key of TRAINERS (`keel federate` asks for ``federated`` itself)."""
    if recipe.align is not None:
        return "align"
    if recipe.sft is not None:
        return "sft"
    return "pretrain" if recipe.model.init == "scratch" else "engine"


def execute(recipe: Recipe, resume: bool, kind: str, full: bool = True, **options) -> Path:
    """Train with TRAINERS[kind] in a fresh (or resumed) run directory, then, with ``full``, the later stages."""
    cls = TRAINERS[kind]()
    if resume and not cls.resumable:
        raise KeelError(
            f"--resume is not supported for {'sft / align' if kind in ('sft', 'align') else kind} recipes; "
            "run the recipe again (a new run directory)"
        )
    trainer = cls(recipe, resume, **options)
    with rundir.lifecycle(recipe, resume) as run:
        try:
            trainer.setup(run.dir)
            trainer.train()
            summary = trainer.save()
        finally:
            trainer.cleanup()
        run.trained(summary, train_wall_seconds=run.seconds())
        if full:
            AFTER[kind](recipe, run)
            run.finish()
    return run.dir


def train_run(recipe: Recipe, resume: bool = False) -> Path:
    """Training only (`keel train`); sft / align recipes are one linear script and also write their report."""
    check_recipe(recipe)
    kind = trainer_kind(recipe)
    return execute(recipe, resume, kind, full=kind in ("sft", "align"))


def full_run(recipe: Recipe, resume: bool = False) -> Path:
    """Everything the recipe asks for (`keel run`): train, test-set evaluation, compression, report."""
    check_recipe(recipe)
    return execute(recipe, resume, trainer_kind(recipe))


def federate(recipe: Recipe, mode: str, resume: bool = False, **options) -> Path:
    """`keel federate [serve] RECIPE`: ``mode`` simulate or serve (options: see keel/federated/run.py)."""
    return execute(recipe, resume, "federated", mode=mode, **options)


# -- the stages after training ---------------------------------------------------------------------------


def _engine_stages(recipe: Recipe, run: rundir.Run) -> None:
    """Test evaluation, samples (causal LM), audit and model card, compression, report (main process only)."""
    from keel.evaluate import evaluate_run
    from keel.report import write_report

    if not is_main_process():
        return
    run_dir = run.dir
    if recipe.data.split.test > 0:
        evaluate_run(run_dir)
    else:
        logger.info("no test split (data.split.test is 0): skipping the test evaluation")
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
            run.fail(str(e))
            raise
    write_report(run_dir)
    if gate_error is not None:
        run.fail(str(gate_error), status="gate failed", wall_seconds=run.seconds())
        raise gate_error


def _report_stage(recipe: Recipe, run: rundir.Run) -> None:
    from keel.report import write_report

    write_report(run.dir)


def _federated_stages(recipe: Recipe, run: rundir.Run) -> None:
    from keel.evaluate import evaluate_run
    from keel.report import write_report

    if recipe.data.split.test > 0:
        evaluate_run(run.dir)
    write_report(run.dir)


AFTER = {
    "engine": _engine_stages,
    "pretrain": _engine_stages,
    "sft": _report_stage,
    "align": _report_stage,
    "federated": _federated_stages,
}


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
