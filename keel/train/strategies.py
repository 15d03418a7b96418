"""How the engine's loop takes a step: which examples each step sees, its backward pass and its update.

The engine (keel/train/engine.py) owns the run's lifecycle: set-up, resume, the epoch loop, evaluation, the best
model, early stopping, checkpoints and the final model. A strategy owns what differs between kinds of training:

    Standard   seeded shuffled (or length-grouped) micro-batches sharded per process, gradient accumulation,
               accelerate's backward and gradient clipping (here); the model replicated (DDP, through
               accelerate) or, with train.parallel=fsdp on several processes, sharded (keel/train/sharded.py)
    DPSGD      Poisson batches of persons, per-example clipping in chunks, noise, the privacy accountant and its
               budget (keel/trust/privacy.py)

The engine calls, in this order: ``setup`` (data and model loaded), ``steps_per_epoch``, ``resumed`` (only when a
resume was asked for), ``start`` (returns the last step to take), ``prepare`` (wraps model and optimiser), then per
epoch ``epoch_items`` and per item ``step``, ``checkpoint_extra`` before each checkpoint and ``finish`` before the
final model is written. This module imports nothing above keel.train (and torch only inside functions), so
keel/trust builds on it without importing the engine, and `keel validate` stays fast.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Run:
    """What a strategy may read (and, in ``prepare``, replace) while the engine trains."""

    recipe: Any
    accelerator: Any
    tokenizer: Any
    data: Any  # keel.data.prepare's prepared data: splits, labels, meta
    train_ds: Any
    task: Any  # a keel.tasks module
    model: Any  # the module the loop calls (wrapped by prepare: DDP, torch.compile)
    optimizer: Any  # the torch optimiser (prepare may wrap it; checkpoints always hold the unwrapped one)
    state: Any  # keel.train.checkpoint.TrainState
    run_dir: Path
    scheduler: Any = None
    extra: dict = field(default_factory=dict)

    @property
    def cfg(self):
        return self.recipe.train


@dataclass
class StepResult:
    loss: float  # the step's mean training loss (nan when a step saw no example)
    samples: int  # examples this step consumed, over all processes
    batches: int  # position units consumed in the epoch (micro-batches for Standard)
    record: dict = field(default_factory=dict)  # extra fields for this step's metrics.jsonl line


class Strategy:
    """The default hooks; a strategy overrides what it needs."""

    label = "training"  # the progress bar's description

    def setup(self, run: Run) -> None:
        """After data and model are loaded, before the optimiser is built (checks, frozen parameters)."""

    def steps_per_epoch(self, run: Run) -> int:
        raise NotImplementedError

    def resumed(self, run: Run, loaded) -> None:
        """A resume was asked for; ``loaded`` is the checkpoint (already loaded into model and state), or None."""

    def start(self, run: Run, planned: int) -> int:
        """Just before the model is prepared: the last step to take (at most ``planned``)."""
        return planned

    def prepare(self, run: Run) -> None:
        run.model, run.optimizer = run.accelerator.prepare(run.model, run.optimizer)

    def epoch_items(self, run: Run, epoch: int) -> list:
        """What is left of this epoch, one item per optimiser step, from the position the state holds."""
        raise NotImplementedError

    def step(self, run: Run, item) -> StepResult:
        """Forward, backward and the optimiser update of one step (the engine steps the schedule)."""
        raise NotImplementedError

    def epoch_after(self, run: Run, epoch: int) -> int:
        """The state's epoch once ``epoch`` has ended (or the run stopped in it)."""
        return epoch + 1

    def checkpoint_extra(self, run: Run) -> dict:
        """JSON to keep in the next checkpoint's ``state.extra``."""
        return {}

    def finish(self, run: Run, summary: dict) -> None:
        """After the loop, before the final model is written; may add to ``summary``."""


def epoch_order(n: int, seed: int, epoch: int, lengths: list[int] | None = None, batch_size: int = 1) -> list[int]:
    """This epoch's example order: a seeded shuffle, or with ``lengths`` transformers' length-grouped shuffle
    (runs of ``batch_size`` examples of similar length, the longest first)."""
    import torch

    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if lengths is None:
        return torch.randperm(n, generator=g).tolist()
    from transformers.trainer_pt_utils import get_length_grouped_indices

    return get_length_grouped_indices(lengths, batch_size, generator=g)


def shard_batches(order: list[int], batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This process's micro-batches. The order is padded by wrapping so every process gets as many."""
    if world > 1:
        pad = (-len(order)) % world
        order = order + order[:pad]
        order = order[rank::world]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class Standard(Strategy):
    """Data order = epoch_order(seed, epoch), sharded per process; ``grad_accum_steps`` micro-batches per step.

    ``loss_fn(model, batch)`` replaces the model's own loss (distillation).
    """

    def __init__(self, loss_fn=None):
        self.loss_fn = loss_fn
        self.lengths = None
        self.pad_multiple = None
        self.sharded = False

    def setup(self, run: Run) -> None:
        self.lengths = [len(ids) for ids in run.train_ds["input_ids"]] if run.cfg.group_by_length else None
        # FSDP shards before the optimiser is built (it replaces the parameters); one process trains unsharded
        if run.cfg.parallel.strategy == "fsdp" and run.accelerator.num_processes > 1:
            from keel.train.sharded import shard

            run.model = shard(run.model, run.cfg.parallel, run.accelerator.device)
            self.sharded = True

    def steps_per_epoch(self, run: Run) -> int:
        acc = run.accelerator
        micro = len(
            shard_batches(list(range(len(run.train_ds))), run.cfg.batch_size, acc.process_index, acc.num_processes)
        )
        return math.ceil(micro / run.cfg.grad_accum_steps)

    def prepare(self, run: Run) -> None:
        import torch

        if not self.sharded:  # a sharded model is on its device already, and accelerate would wrap it in DDP
            super().prepare(run)
        device = run.accelerator.device
        if run.recipe.model.init == "scratch" and run.recipe.pretrain.compile and device.type == "cuda":
            run.model = torch.compile(run.model)  # pretraining on a GPU: fused kernels; unwrap_model() strips it
        # On a GPU, a few padded lengths instead of one per batch: fused attention kernels (cuDNN) plan per shape.
        self.pad_multiple = 16 if device.type == "cuda" else None

    def epoch_items(self, run: Run, epoch: int) -> list:
        cfg, acc = run.cfg, run.accelerator
        world = acc.num_processes
        order = epoch_order(len(run.train_ds), cfg.seed, epoch, self.lengths, cfg.batch_size * world)
        batches = shard_batches(order, cfg.batch_size, acc.process_index, world)
        return [
            batches[b : b + cfg.grad_accum_steps]
            for b in range(run.state.batch_in_epoch, len(batches), cfg.grad_accum_steps)
        ]

    def step(self, run: Run, group: list[list[int]]) -> StepResult:
        import torch

        acc, model, device = run.accelerator, run.model, run.accelerator.device
        running = torch.zeros((), device=device)
        for i, idx in enumerate(group):
            sync = i == len(group) - 1
            if self.sharded:  # FSDP reduce-scatters the gradients of the last micro-batch only
                model.set_requires_gradient_sync(sync)
            with nullcontext() if sync or acc.num_processes == 1 or self.sharded else acc.no_sync(model):
                batch = {
                    k: v.to(device, non_blocking=True)
                    for k, v in run.task.collate(run.train_ds[idx], run.tokenizer, self.pad_multiple).items()
                }
                with acc.autocast():
                    loss = self.loss_fn(model, batch) if self.loss_fn else model(**batch).loss  # micro-batch mean
                acc.backward(loss / len(group))
            running += loss.detach().float() / len(group)
        max_norm = run.cfg.max_grad_norm
        grad_norm = acc.clip_grad_norm_(model.parameters(), max_norm) if max_norm else None
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        record = {} if grad_norm is None else {"grad_norm": float(grad_norm)}
        return StepResult(
            acc.reduce(running, "mean").item(), sum(len(x) for x in group) * acc.num_processes, len(group), record
        )
