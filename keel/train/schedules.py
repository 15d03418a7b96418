"""The learning-rate schedules of ``train.schedule``: warm-up, then linear or cosine decay, or constant.

The same ``LambdaLR`` as transformers' ``get_scheduler`` builds for these names (its formulas, step for step, so a
checkpoint of either resumes with the other), without importing ``transformers.optimization``: that module pulls in
transformers' trainer utilities and, through them, peft, about 5 s on 2 CPU cores before the first training step.
"""

from __future__ import annotations

import math
from functools import partial


def _constant(step: int, *, num_warmup_steps: int) -> float:
    if step < num_warmup_steps:
        return float(step) / float(max(1.0, num_warmup_steps))
    return 1.0


def _linear(step: int, *, num_warmup_steps: int, num_training_steps: int) -> float:
    if step < num_warmup_steps:
        return float(step) / float(max(1, num_warmup_steps))
    return max(0.0, float(num_training_steps - step) / float(max(1, num_training_steps - num_warmup_steps)))


def _cosine(step: int, *, num_warmup_steps: int, num_training_steps: int, num_cycles: float = 0.5) -> float:
    if step < num_warmup_steps:
        return float(step) / float(max(1, num_warmup_steps))
    progress = float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))


def make_scheduler(optimizer, schedule: str, num_warmup_steps: int, num_training_steps: int):
    """``schedule``: linear, cosine or constant (after ``num_warmup_steps`` of linear warm-up from 0)."""
    from torch.optim.lr_scheduler import LambdaLR

    if schedule == "constant":
        fn = partial(_constant, num_warmup_steps=num_warmup_steps)
    elif schedule in ("linear", "cosine"):
        fn = partial(
            _linear if schedule == "linear" else _cosine,
            num_warmup_steps=num_warmup_steps,
            num_training_steps=num_training_steps,
        )
    else:
        raise ValueError(f"unknown schedule {schedule!r}: linear, cosine or constant")
    return LambdaLR(optimizer, fn)
