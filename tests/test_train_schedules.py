"""The engine's learning-rate schedules: transformers' get_scheduler step for step, without its imports."""

import json
import subprocess
import sys

import pytest
import torch

from keel.train.schedules import make_scheduler

HF_NAME = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def lrs(scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        scheduler.optimizer.step()
        scheduler.step()
        out.append(scheduler.get_last_lr()[0])
    return out


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
@pytest.mark.parametrize(("warmup", "total"), [(0, 1), (0, 17), (3, 17), (30, 300), (5, 5)])
def test_schedules_match_transformers(schedule, warmup, total):
    from transformers import get_scheduler

    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)

    ours = make_scheduler(optimizer(), schedule, warmup, total)
    theirs = get_scheduler(HF_NAME[schedule], optimizer(), num_warmup_steps=warmup, num_training_steps=total)
    assert ours.get_last_lr() == theirs.get_last_lr()
    assert lrs(ours, total + 3) == lrs(theirs, total + 3)  # exactly: a checkpoint of either resumes with the other
    assert ours.state_dict() == theirs.state_dict()


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        make_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), "step", 0, 10)


@pytest.mark.slow  # trains the tiny model in a fresh process
def test_a_training_run_skips_trainer_imports_and_writes_the_best_weights_once(tmp_path, tiny_recipe):
    # transformers.optimization imports the trainer utilities and peft: seconds before the first step
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from keel.recipe import load_recipe\n"
        "from keel.train.engine import train\n"
        f"train(load_recipe({str(tiny_recipe(epochs=1))!r}), Path('run'))\n"
        "heavy = ('transformers.optimization', 'transformers.trainer_utils', 'peft')\n"
        "print(json.dumps([m for m in heavy if m in sys.modules]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    # the one epoch's evaluation was the best: its checkpoint links best/'s weights instead of writing them again
    (step,) = (tmp_path / "run" / "checkpoints").glob("step-*")
    best = tmp_path / "run" / "checkpoints" / "best" / "model.safetensors"
    assert (step / "model.safetensors").stat().st_ino == best.stat().st_ino
