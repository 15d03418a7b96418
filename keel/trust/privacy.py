"""Differentially private training (DP-SGD, Abadi et al. 2016) with Opacus, behind ``train.privacy``.

A strategy of the engine's one loop (``DPSGD``, keel/train/strategies.py), which does evaluation, the best
model, early stopping, checkpoints and the final model as for every run. The strategy takes the steps: each draws a Poisson
batch (every training example joins with probability q = batch_size / N) from a generator seeded by
(seed, step), so the data order needs no state and a resumed run replays the same batches. Opacus's
GradSampleModule computes per-example gradients, DPOptimizer clips each to ``max_grad_norm`` and adds
Gaussian noise of std sigma * max_grad_norm, and an Opacus accountant (PRV or RDP) tracks epsilon.

The budget is enforced: before training, the last step whose epsilon stays within ``target_epsilon``
is found with the accountant; training stops there and says so. sigma and the accountant history
live in every checkpoint (JSON, in ``state.extra``), so a resumed run keeps the same sigma and budget.

With counterfactual augmentation (``audit.fairness.mitigation: counterfactual-augmentation``) a person's text
and its swapped copy are two rows: the guarantee is kept per person, not per row. Persons (the original
training texts) are Poisson-sampled, each with all of their rows; every row is clipped at ``max_grad_norm / k``
(k = 2 rows per person at most), so one person's rows together move the sum by at most ``max_grad_norm``; the
noise stays sigma * max_grad_norm. That is the subsampled Gaussian mechanism over persons, so q = batch_size / N,
the ``delta < 1/N`` check and epsilon all use N = persons, not rows.

Not supported (refused with a message): several processes, mixed precision, gradient accumulation
(the Poisson batch is the logical batch), BatchNorm (mixes examples, so per-example gradients are undefined),
fixed-size shuffled batches (``poisson_sampling: false``: no accountant here analyses them).

This module imports torch only inside the functions that train, so ``keel validate`` stays fast.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from keel.errors import KeelError, RecipeError

logger = logging.getLogger(__name__)


def make_accountant(kind: str, history: list | None = None):
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=kind)
    acc.history = [tuple(h) for h in (history or [])]
    return acc


def epsilon_after(kind: str, sigma: float, q: float, steps: int, delta: float) -> float:
    if steps == 0:
        return 0.0
    return float(make_accountant(kind, [(sigma, q, steps)]).get_epsilon(delta=delta))


def steps_within_budget(kind: str, sigma: float, q: float, delta: float, target: float, upper: int) -> int:
    """The largest t <= upper with epsilon(t) <= target (epsilon grows with t): binary search."""
    if epsilon_after(kind, sigma, q, upper, delta) <= target:
        return upper
    lo, hi = 0, upper  # eps(lo) <= target < eps(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if epsilon_after(kind, sigma, q, mid, delta) <= target else (lo, mid)
    return lo


def poisson_batch(n: int, q: float, seed: int, step: int) -> list[int]:
    """Indices of step ``step``'s batch: each of the n examples independently with probability q."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.nonzero(torch.rand(n, generator=g) < q).flatten().tolist()


def check_model(model) -> None:
    from opacus.validators import ModuleValidator

    was_training = model.training
    model.train()  # Opacus also insists on train mode; that is not the model's fault
    errors = ModuleValidator.validate(model, strict=False)
    model.train(was_training)
    if errors:
        first = str(errors[0]).splitlines()[0]
        raise RecipeError(
            f"train.privacy: this model cannot be trained with DP-SGD ({first}); "
            "pick a model without BatchNorm (e.g. a transformer with LayerNorm)"
        )


def clipped_backward(dp_opt, idx: list[int], chunk_size: int, loss_of) -> float:
    """Backward passes over ``idx`` in chunks of ``chunk_size``; returns the batch's mean loss.

    Each chunk's per-example gradients are clipped and summed into the optimiser, then dropped (Opacus' skipped
    steps), so memory holds one chunk's per-example gradients; the caller's ``dp_opt.step()`` adds the noise once.
    """
    total = 0.0
    chunks = [idx[i : i + chunk_size] for i in range(0, len(idx), chunk_size)]
    for c, chunk in enumerate(chunks):
        loss = loss_of(chunk)
        loss.backward()
        total += float(loss.detach()) * len(chunk) / len(idx)
        if c < len(chunks) - 1:
            dp_opt.signal_skip_step(do_skip=True)
            dp_opt.step()  # clip and accumulate this chunk; no noise, no update
            dp_opt.zero_grad(set_to_none=True)
    return total


# Model families whose layers are all per-example (LayerNorm / RMSNorm, no BatchNorm): `keel validate` passes them
# without building the model; any other family is checked on the real model when training starts.
PER_EXAMPLE_FAMILIES = frozenset(
    {
        "bert",
        "distilbert",
        "roberta",
        "xlm-roberta",
        "camembert",
        "albert",
        "electra",
        "deberta",
        "deberta-v2",
        "mpnet",
        "ernie",
        "modernbert",
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "phi",
        "phi3",
        "gpt2",
        "gpt_neox",
        "opt",
        "smollm3",
    }
)


def check_privacy_recipe(recipe, n_train: int | None = None) -> None:
    """The checks `keel validate` runs for train.privacy; no torch, no model built.

    ``n_train`` is the exact number of persons (training texts before any augmentation); without it the data file's
    row count bounds it from above (a cheap read), and the file is read in full only when the bound cannot decide.
    """
    p, cfg = recipe.train.privacy, recipe.train
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RecipeError("train.privacy runs in one process; launch without torchrun/accelerate")
    # mixed precision, gradient accumulation and fixed-size batches are refused by the recipe schema (TrainConfig)
    exact = n_train is not None
    if not exact:
        bound = train_rows_upper_bound(recipe)
        if bound is not None and 0 < bound and p.delta < 1.0 / bound and cfg.batch_size < bound:
            n_train = bound  # delta < 1/bound <= 1/N holds; the batch size is checked exactly when training starts
        else:
            from keel.data.load import load_splits

            n_train, exact = len(load_splits(recipe.data, recipe.task).train), True
    if n_train == 0:
        raise RecipeError("train.privacy: the training split is empty")
    if exact and p.delta >= 1.0 / n_train:
        raise RecipeError(
            f"train.privacy.delta = {p.delta:g} is not below 1/N = {1.0 / n_train:.3g} (N = {n_train} "
            f"training examples): such a delta allows leaking whole examples; set train.privacy.delta="
            f"{10 ** math.floor(math.log10(0.1 / n_train)):g}"
        )
    if exact and cfg.batch_size >= n_train:
        raise RecipeError(
            f"train.privacy: train.batch_size {cfg.batch_size} must be below the {n_train} training examples"
        )
    check_architecture(recipe)


def train_rows_upper_bound(recipe) -> int | None:
    """An upper bound on the training split's size from the data file's row count, or None when not cheap.

    Dropping empty and repeated texts only removes rows, and the split's train share never shrinks when rows are
    added, so the split arithmetic on the file's rows bounds N from above.
    """
    d = recipe.data
    if recipe.task != "classification" or d.path is None:
        return None
    from keel.data.load import FORMATS

    path = Path(d.path).expanduser()
    kind = d.format if d.format != "auto" else FORMATS.get(path.suffix.lower())
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            rows = pq.read_metadata(path).num_rows
        elif kind == "csv":
            import csv

            with open(path, encoding="utf-8", errors="replace", newline="") as f:
                rows = sum(1 for _ in csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")) - 1
        elif kind == "jsonl":
            with open(path, encoding="utf-8", errors="replace") as f:
                first = f.read(1).lstrip()
                if first == "[":
                    return None  # a JSON array, not lines
                f.seek(0)
                rows = sum(1 for line in f if line.strip())
        else:
            return None
    except Exception:  # noqa: BLE001  (any trouble: the exact read decides, and names the problem)
        return None
    s = d.split
    rest = rows - (round(rows * s.test) if s.test else 0)
    frac = s.validation / (1 - s.test) if s.test < 1 else 0
    n = rest - (round(rest * frac) if frac else 0)
    return max(0, min(n, d.max_train_samples) if d.max_train_samples else n)


def check_architecture(recipe) -> None:
    """BatchNorm mixes the examples of a batch, so per-example gradients (and DP-SGD) are undefined for it.

    Built-in models and the families in PER_EXAMPLE_FAMILIES pass from config.json alone; for any other model the
    real modules are checked when training starts (``check_model``), before the first step.
    """
    import json

    from keel.models.registry import resolve_model

    name, spec = resolve_model(recipe.model.name)
    if spec is not None or recipe.model.init == "scratch":
        return  # keel's own models: transformers with LayerNorm / RMSNorm
    try:
        model_type = json.loads((Path(name) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        model_type = None
    if model_type not in PER_EXAMPLE_FAMILIES:
        logger.info(f"train.privacy: model type {model_type!r} is checked for BatchNorm when training starts")


def dp_optimizer_args(sigma: float, max_grad_norm: float, rows_per_person: int) -> dict:
    """DPOptimizer settings that give (sigma, q)-subsampled-Gaussian privacy per person of up to k rows.

    Opacus clips each row at ``max_grad_norm`` and adds noise of std ``noise_multiplier * max_grad_norm``: rows
    clipped at C/k with noise multiplier k * sigma give a person sensitivity k * C/k = C and noise std sigma * C.
    """
    k = rows_per_person
    return {"noise_multiplier": sigma * k, "max_grad_norm": max_grad_norm / k}


def person_rows(original, train_ds, recipe) -> list[list[int]]:
    """For each person (a row of the original training split), the rows of ``train_ds`` that come from them.

    Counterfactual augmentation appends one swapped copy per text that names a group, in the original order
    (``keel.trust.cda.swap_sources``); any other difference in length is a mismatch keel refuses to account for.
    """
    n, rows = len(original), len(train_ds)
    out = [[i] for i in range(n)]
    if rows == n:
        return out
    from keel.trust.cda import swap_sources

    sources = [i for i, _ in swap_sources(list(original["text"]), recipe)]
    if n + len(sources) != rows:
        raise KeelError(
            f"train.privacy: {rows} training rows do not match {n} texts plus {len(sources)} "
            "counterfactual copies; privacy cannot be accounted per person"
        )
    for j, i in enumerate(sources):
        out[i].append(n + j)
    return out


def per_example_inputs(batch: dict, model) -> dict:
    """Batch-expanded position (and token-type) ids: per-example gradients of the position embeddings
    need a batch dimension on their input (Opacus: 'stack expects each tensor to be equal size')."""
    import torch

    B, T = batch["input_ids"].shape
    batch["position_ids"] = torch.arange(T, device=batch["input_ids"].device).unsqueeze(0).repeat(B, 1)  # (B, T)
    if getattr(model.config, "type_vocab_size", 0) and "token_type_ids" not in batch:
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])  # (B, T)
    return batch
