"""Differentially private training (DP-SGD, Abadi et al. 2016) with Opacus, behind ``train.privacy``.

Its own loop, next to the engine's (whose non-private path is untouched): each step draws a Poisson
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

import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

from keel.errors import CheckpointError, KeelError, RecipeError
from keel.progress import log, progress


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
        raise RecipeError(f"train.privacy: this model cannot be trained with DP-SGD ({first}); "
                          "pick a model without BatchNorm (e.g. a transformer with LayerNorm)")


def clipped_backward(dp_opt, idx: list[int], chunk_size: int, loss_of) -> float:
    """Backward passes over ``idx`` in chunks of ``chunk_size``; returns the batch's mean loss.

    Each chunk's per-example gradients are clipped and summed into the optimiser, then dropped (Opacus' skipped
    steps), so memory holds one chunk's per-example gradients; the caller's ``dp_opt.step()`` adds the noise once.
    """
    total = 0.0
    chunks = [idx[i: i + chunk_size] for i in range(0, len(idx), chunk_size)]
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
PER_EXAMPLE_FAMILIES = frozenset({
    "bert", "distilbert", "roberta", "xlm-roberta", "camembert", "albert", "electra", "deberta", "deberta-v2",
    "mpnet", "ernie", "modernbert", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "gpt2",
    "gpt_neox", "opt", "smollm3"})


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
        raise RecipeError(f"train.privacy.delta = {p.delta:g} is not below 1/N = {1.0 / n_train:.3g} (N = {n_train} "
                          f"training examples): such a delta allows leaking whole examples; set train.privacy.delta="
                          f"{10 ** math.floor(math.log10(0.1 / n_train)):g}")
    if exact and cfg.batch_size >= n_train:
        raise RecipeError(f"train.privacy: train.batch_size {cfg.batch_size} must be below the {n_train} training examples")
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
        log(f"train.privacy: model type {model_type!r} is checked for BatchNorm when training starts")


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
        raise KeelError(f"train.privacy: {rows} training rows do not match {n} texts plus {len(sources)} "
                              "counterfactual copies; privacy cannot be accounted per person")
    for j, i in enumerate(sources):
        out[i].append(n + j)
    return out


def _per_example_inputs(batch: dict, model) -> dict:
    """Batch-expanded position (and token-type) ids: per-example gradients of the position embeddings
    need a batch dimension on their input (Opacus: 'stack expects each tensor to be equal size')."""
    import torch

    B, T = batch["input_ids"].shape
    batch["position_ids"] = torch.arange(T, device=batch["input_ids"].device).unsqueeze(0).repeat(B, 1)  # (B, T)
    if getattr(model.config, "type_vocab_size", 0) and "token_type_ids" not in batch:
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])  # (B, T)
    return batch


def train_private(recipe, run_dir: Path, resume: bool = False) -> dict:
    """DP-SGD training per the recipe; the same run-directory layout and summary as the engine, plus ``privacy``."""
    import resource

    import torch
    from accelerate.utils import set_seed
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from transformers import get_scheduler
    from transformers.utils import logging as hf_logging

    from keel.io import atomic_dir, atomic_write_json, verify_manifest
    from keel.tasks import get_task
    from keel.train import checkpoint as ckpt
    from keel.train.engine import (build_optimizer, check_resume_compatible, configure_determinism,
                                   load_data_and_model, save_final_model)
    from keel.train.metrics import MetricLog

    hf_logging.disable_progress_bar()
    cfg, p = recipe.train, recipe.train.privacy
    configure_determinism(recipe)
    set_seed(cfg.seed)
    run_dir, ckpt_root = Path(run_dir), Path(run_dir) / "checkpoints"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, data, train_ds, model = load_data_and_model(recipe, run_dir=run_dir)
    val_ds, task = data.splits["validation"], get_task(recipe.task)
    rows_of = person_rows(data.splits["train"], train_ds, recipe)  # person -> their rows (a text + its swapped copy)
    n, per_person = len(rows_of), max(len(r) for r in rows_of)  # N counts persons, not augmented rows
    check_privacy_recipe(recipe, n)
    check_model(model)
    if p.freeze_embeddings:
        frozen = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        for m in frozen:
            m.weight.requires_grad_(False)
        log(f"DP-SGD: {len(frozen)} embedding tables frozen (train.privacy.freeze_embeddings)")

    q = cfg.batch_size / n
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    planned = cfg.epochs * steps_per_epoch if not cfg.max_steps else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    optimizer = build_optimizer(model, recipe)
    scheduler = get_scheduler("constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule, optimizer,
                              num_warmup_steps=round(cfg.warmup_ratio * planned), num_training_steps=planned)

    state, restored_rng, history = ckpt.TrainState(), None, []
    sigma = p.noise_multiplier
    ckpt.clean_partial(ckpt_root)
    loaded = ckpt.resume_point(ckpt_root, model, recipe, check=check_resume_compatible) if resume else None
    if resume and loaded is None:
        raise CheckpointError(f"nothing to resume: {ckpt_root} has no complete checkpoint; run without --resume")
    if resume:
        optimizer.load_state_dict(loaded.optimizer)
        scheduler.load_state_dict(loaded.scheduler)
        state, restored_rng = loaded.state, loaded.rng
        saved = state.extra.get("privacy")
        if not saved:
            raise CheckpointError(f"{loaded.path} has no privacy accountant state: it was not trained with train.privacy")
        sigma, history = saved["noise_multiplier"], saved["history"]  # the budget was planned with this sigma
        log(f"resuming DP training from {loaded.path.name} (step {state.step}, epsilon so far {saved['epsilon']:.3f})")
    if sigma is None:
        from opacus.accountants.utils import get_noise_multiplier

        sigma = float(get_noise_multiplier(target_epsilon=p.target_epsilon, target_delta=p.delta, sample_rate=q,
                                           steps=planned, accountant=p.accountant))
    allowed = steps_within_budget(p.accountant, sigma, q, p.delta, p.target_epsilon, planned)
    if allowed == 0:
        raise RecipeError(f"train.privacy: one step at sigma {sigma:g} and q {q:.4g} already spends more than epsilon "
                          f"{p.target_epsilon}; raise train.privacy.noise_multiplier or target_epsilon")
    if allowed < planned:
        log(f"[yellow]privacy budget: epsilon {p.target_epsilon} allows {allowed} of the {planned} planned steps "
            f"at sigma {sigma:.4f}; training stops at step {allowed}[/]")
    accountant = make_accountant(p.accountant, history)

    model.to(device)
    model.train()
    gs_model = GradSampleModule(model)
    # Each row is clipped at C/k, so a person's k rows move the sum by at most C; the noise std stays sigma * C.
    dp_opt = DPOptimizer(optimizer, **dp_optimizer_args(sigma, p.max_grad_norm, per_person),
                         expected_batch_size=max(1, round(q * len(train_ds))))
    metrics = MetricLog(run_dir, enabled=True, resume_step=state.step if resume else None)
    if restored_rng is not None:
        ckpt.restore_rng(*restored_rng)  # the noise comes from torch's global RNG: restored, it replays
    metric_name = recipe.selection_metric
    higher = metric_name != "loss"
    recipe_yaml, recipe_sha = recipe.to_yaml(), recipe.sha256()

    def privacy_state() -> dict:
        eps = float(accountant.get_epsilon(delta=p.delta)) if accountant.history else 0.0
        return {"epsilon": eps, "delta": p.delta, "target_epsilon": p.target_epsilon, "noise_multiplier": sigma,
                "sample_rate": q, "steps": state.step, "planned_steps": planned, "steps_within_budget": allowed,
                "budget_exhausted": allowed < planned and state.step >= allowed, "accountant": p.accountant,
                "max_grad_norm": p.max_grad_norm, "poisson_sampling": p.poisson_sampling,
                # a causal LM trains on blocks of max_length tokens cut from joined documents: the guarantee is per block
                "unit": "person" if per_person > 1 else ("block" if recipe.task == "causal-lm" else "example"),
                "persons": n, "rows": len(train_ds),
                "rows_per_person": per_person, "row_clip": p.max_grad_norm / per_person,
                "history": [list(h) for h in accountant.history]}

    def save() -> None:
        state.extra["privacy"] = privacy_state()
        ckpt.save_checkpoint(ckpt_root, model, optimizer, scheduler, state, recipe_yaml, recipe_sha, [ckpt.capture_rng()])
        ckpt.prune_checkpoints(ckpt_root, cfg.keep_last_k)

    def evaluate(epoch: int) -> None:
        if len(val_ds) == 0:
            return
        result = task.evaluate(model, val_ds, tokenizer, cfg.eval_batch_size, device, nullcontext)
        model.train()
        value = result[metric_name]
        metrics.write({"split": "validation", "step": state.step, "epoch": epoch + 1,
                       **{k: v for k, v in result.items() if isinstance(v, (int, float))}})
        better = state.best_metric is None or (value > state.best_metric if higher else value < state.best_metric)
        if better:
            state.best_metric, state.best_step, state.evals_without_improvement = float(value), state.step, 0
            with atomic_dir(ckpt_root / "best") as tmp:
                from safetensors.torch import save_model

                save_model(model, str(tmp / "model.safetensors"))
        else:
            state.evals_without_improvement += 1
        log(f"epoch {epoch + 1}: validation {metric_name} {value:.4f}" + (" [green](best)[/]" if better else ""))

    stop = min(planned, allowed)
    state.finished = state.stopped_early or state.step >= stop  # a resume with more epochs continues, within budget
    t0, start_step = time.perf_counter(), state.step
    with progress("step") as bar:
        bar_id = bar.add_task("DP training", total=stop, completed=min(state.step, stop), info="")
        while state.step < stop and not state.finished:
            epoch = state.step // steps_per_epoch
            idx = [r for i in poisson_batch(n, q, cfg.seed, state.step) for r in rows_of[i]]  # persons, all rows
            if idx:
                # A logical (Poisson) batch in physical chunks: each chunk's per-example gradients are clipped and
                # summed, then dropped (Opacus' skipped steps); noise is added once, after the last chunk.
                def chunk_loss(chunk):
                    batch = {k: v.to(device) for k, v in task.collate(train_ds[chunk], tokenizer).items()}
                    return gs_model(**_per_example_inputs(batch, model)).loss  # mean over this chunk

                step_loss = clipped_backward(dp_opt, idx, p.max_physical_batch_size, chunk_loss)
            else:  # an empty Poisson batch still takes a (noise-only) step: the accountant counts it
                for prm in dp_opt.params:
                    prm.grad_sample = torch.zeros((0, *prm.shape), device=prm.device)
                step_loss = float("nan")
            dp_opt.step()
            scheduler.step()
            dp_opt.zero_grad(set_to_none=True)
            accountant.step(noise_multiplier=sigma, sample_rate=q)
            state.step, state.samples_seen = state.step + 1, state.samples_seen + len(idx)
            metrics.write({"step": state.step, "epoch": epoch + 1, "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                           "samples": state.samples_seen, "batch": len(idx)})
            bar.update(bar_id, completed=state.step, info=f"epoch {epoch + 1}/{cfg.epochs} loss {step_loss:.4f}")
            epoch_end = state.step % steps_per_epoch == 0 or state.step >= stop
            if epoch_end:
                evaluate(epoch)
                state.epoch = state.step // steps_per_epoch
                if cfg.early_stopping and state.evals_without_improvement >= cfg.early_stopping.patience:
                    state.stopped_early = True
                    log(f"early stopping: no improvement in {metric_name} for {state.evals_without_improvement} evaluations")
                state.finished = state.stopped_early or state.step >= stop
                save()
            elif cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                save()
    elapsed = time.perf_counter() - t0
    priv = privacy_state()
    if priv["budget_exhausted"]:
        log(f"[yellow]privacy budget reached: stopped at step {state.step} of {planned}, epsilon {priv['epsilon']:.3f} "
            f"<= {p.target_epsilon}[/]")
    log(f"privacy: (epsilon {priv['epsilon']:.3f}, delta {p.delta:g}) with sigma {sigma:.4f}, q {q:.5f}, "
        f"{state.step} steps ({p.accountant} accountant)")
    if per_person > 1:
        log(f"privacy is per person: {n} persons, {len(train_ds)} rows with their counterfactual copies, each row "
            f"clipped at {p.max_grad_norm / per_person:g} so a person's {per_person} rows together stay within "
            f"{p.max_grad_norm:g}")
    if (ckpt_root / "best" / "manifest.json").is_file():
        from safetensors.torch import load_model

        verify_manifest(ckpt_root / "best")
        load_model(model, str(ckpt_root / "best" / "model.safetensors"))
    priv.pop("history")
    summary = {"steps": state.step, "epochs_done": state.epoch, "stopped_early": state.stopped_early,
               "best_step": state.best_step, "best_metric": state.best_metric, "selection_metric": metric_name,
               "train_seconds_this_session": round(elapsed, 2),
               "samples_per_second": round((state.samples_seen) / elapsed, 2) if elapsed > 0 and start_step == 0 else None,
               "seconds_per_step": round(elapsed / max(1, state.step - start_step), 4),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "world_size": 1, "labels": data.labels, "data": data.meta, "privacy": priv}
    gs_model.remove_hooks()
    for prm in model.parameters():
        prm.grad_sample = None
    save_final_model(model, tokenizer, run_dir / "model", recipe, summary)
    atomic_write_json(run_dir / "train.json", summary)
    metrics.close()
    return summary
