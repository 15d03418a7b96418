"""The training loop, one for every task and for DP-SGD: accelerate underneath, exact resume on top.

Read top to bottom: set-up (determinism, data, model, optimiser, schedule), optional resume from the
last complete checkpoint, the epoch loop (steps -> checkpoints), evaluation at each epoch end (best
model, early stopping), then the final model in Hugging Face format. How each step is taken (which
examples, backward, update) is a strategy's (keel/train/strategies.py): Standard, or DP-SGD from
keel/trust/privacy.py (Poisson batches, per-example clipping, noise, the accountant and its budget).

Data order is a pure function of (seed, epoch): each epoch draws ``randperm`` from a generator seeded
with ``seed + epoch``, and a checkpoint stores the position in that order. With the RNG state of
every process restored too, a resumed run replays exactly the steps the original would have taken.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import resource
import time
from pathlib import Path

import torch

from keel.data.prepare import prepare_data
from keel.errors import CheckpointError, KeelError
from keel.io import MANIFEST, atomic_dir, atomic_write_json, sha256_file, verify_manifest
from keel.metrics import MetricLog
from keel.models import model_dir
from keel.progress import progress
from keel.recipe import Recipe, validate_recipe
from keel.tasks import get_task
from keel.train import checkpoint as ckpt
from keel.train import schedules, sharded
from keel.train.strategies import Run, Standard, Strategy

logger = logging.getLogger(__name__)

# Resuming may change only these fields; anything else would silently change the run.
RESUMABLE_CHANGES = (
    "train.epochs",
    "train.max_steps",
    "train.early_stopping",
    "train.keep_last_k",
    "train.checkpoint_every",
    "train.num_threads",
    "output.dir",
    "compress",
    "serve",
    "learn",
    "audit.explain",
    "audit.gates",
    "train.privacy.max_physical_batch_size",
    "train.parallel.reshard_after_forward",
    "train.parallel.cpu_offload",
    "train.parallel.ray",
)

# Called on every process after each checkpoint with its folder (Ray Train reports it: keel/raytrain.py).
CHECKPOINT_LISTENERS: list = []


def set_threads(recipe: Recipe) -> None:
    """train.num_threads (default: torch's choice); 1 each when several processes share one machine."""
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)


def configure_determinism(recipe: Recipe) -> None:
    set_threads(recipe)
    if recipe.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also fills every new tensor with NaN, to expose ops that read memory they never wrote;
        # none of keel's do (the exact-resume tests compare curves bit for bit), and the fill cost about 3% of a
        # MiniLM step on CPU. Results stay deterministic without it (PyTorch's note on this flag says so).
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.benchmark = False


def make_accelerator(recipe: Recipe):
    from accelerate import Accelerator

    mp = recipe.train.mixed_precision
    if mp == "fp16" and not torch.cuda.is_available():
        raise KeelError("train.mixed_precision: fp16 needs a CUDA GPU; use train.mixed_precision=bf16 or no on CPU")
    return Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())


def build_optimizer(model, recipe: Recipe):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused (one kernel over all tensors, on CPU as on GPU), as HF Trainer's default adamw_torch_fused: the
    # per-tensor loop took about a fifth of a MiniLM step on CPU, more than any other part keel adds.
    return torch.optim.AdamW(groups, lr=recipe.train.lr, fused=True)


def check_resume_compatible(saved_yaml: str, recipe: Recipe) -> list[str]:
    """Fields that differ between the checkpoint's recipe and this one; raises on ones that matter."""
    import yaml

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
        return out

    saved = yaml.safe_load(saved_yaml)
    try:  # read with today's defaults, so a field added since the checkpoint counts as unchanged at its default
        saved = validate_recipe(saved).model_dump(mode="json")
    except KeelError:
        pass
    old, new = flat(saved), flat(recipe.model_dump(mode="json"))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    for key in changed:
        if not key.startswith(RESUMABLE_CHANGES):
            raise CheckpointError(
                f"cannot resume: {key} was {old.get(key)!r} in the checkpoint and is {new.get(key)!r} now; "
                f"set {key}={old.get(key)} or start a new run"
            )
    return changed


def check_resumable(run_dir: Path, recipe: Recipe) -> None:
    """Before a resume writes anything into ``run_dir``: this recipe against the newest checkpoint's (one whose
    recipe.yaml matches its manifest), so a refused resume leaves the run's recipe.yaml and run.json as they were.
    The engine checks the checkpoint it loads again (``resume_point``)."""
    for path in reversed(ckpt.list_checkpoints(Path(run_dir) / "checkpoints")):
        try:
            listed = json.loads((path / MANIFEST).read_text())["files"]["recipe.yaml"]["sha256"]
            if sha256_file(path / "recipe.yaml") == listed:
                check_resume_compatible((path / "recipe.yaml").read_text(), recipe)
                return
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged checkpoint: resume_point names it and falls back


def param_fingerprint(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_data_and_model(recipe: Recipe, build_model=None, run_dir: Path | None = None):
    """(tokenizer, prepared data, training split, model) as the recipe says.

    The training split gets counterfactual copies when the recipe asks for that fairness mitigation;
    ``build_model(path, labels)`` replaces the task's model builder. Shared by the engine and DP-SGD.
    """
    from transformers import AutoTokenizer

    if recipe.model.init == "scratch":
        from keel.pretrain import scratch_model_dir

        path = scratch_model_dir(recipe)  # a trained tokenizer and random weights of a size preset
    else:
        path = model_dir(recipe.model.name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = prepare_data(recipe, tokenizer, run_dir, freeze=run_dir is not None)  # frozen in run_dir/splits
    train_ds = data.splits["train"]
    if recipe.data.weak is not None:  # labels from labelling functions (keel/data/weak.py), before any copies
        from keel.data.weak import weak_train

        train_ds = weak_train(train_ds, tokenizer, recipe, data, run_dir)
    if recipe.data.augment is not None:  # augmented copies of the training split only (keel/augment/text.py)
        from keel.augment.text import augment_train

        train_ds = augment_train(train_ds, tokenizer, recipe, run_dir)
    if recipe.audit and recipe.audit.fairness and recipe.audit.fairness.mitigation == "counterfactual-augmentation":
        from keel.trust.cda import augment  # training-time fairness mitigation

        train_ds = augment(train_ds, tokenizer, recipe)
    model = (build_model or get_task(recipe.task).build_model)(path, data.labels)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, data, train_ds, model


def default_strategy(recipe: Recipe, build_model=None, loss_fn=None) -> Strategy:
    """The recipe's strategy: DP-SGD when ``train.privacy`` is set (keel/trust/privacy.py), else Standard."""
    if recipe.train.privacy is None:
        return Standard(loss_fn)
    if build_model or loss_fn:
        raise KeelError(
            "training stages after a differentially private run would spend privacy outside its "
            "accountant; compress a DP model by quantization only (unset compress.distill/prune)"
        )
    # keel.trust.privacy builds on keel.train.strategies only, never on the engine: no cycle
    from keel.train.dpsgd import DPSGD

    return DPSGD()


def train(
    recipe: Recipe,
    run_dir: Path,
    resume: bool = False,
    *,
    build_model=None,
    loss_fn=None,
    model_info: dict | None = None,
    strategy: Strategy | None = None,
) -> dict:
    """Train per the recipe into ``run_dir``; returns a summary. The final model lands in run_dir/model.

    Later stages reuse the loop: ``build_model(path, labels)`` replaces the task's model builder (a student
    cut from a teacher, a pruned model) and ``loss_fn(model, batch)`` the model's own loss (distillation);
    ``model_info`` is added to the final model's keel.json. ``strategy`` takes the steps (batching, backward,
    update; keel/train/strategies.py); by default the recipe's (``default_strategy``).
    """
    strategy = strategy or default_strategy(recipe, build_model, loss_fn)
    from accelerate.utils import gather_object, set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    configure_determinism(recipe)
    accelerator = make_accelerator(recipe)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    cfg = recipe.train
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    set_seed(cfg.seed)

    # -- data and model ---------------------------------------------------------------------------
    with accelerator.main_process_first():  # the main process fills the caches; the others then read them
        tokenizer, data, train_ds, model = load_data_and_model(recipe, build_model, run_dir)
    val_ds, task = data.splits["validation"], get_task(recipe.task)
    state = ckpt.TrainState()
    run = Run(recipe, accelerator, tokenizer, data, train_ds, task, model, None, state, run_dir)
    strategy.setup(run)

    steps_per_epoch = strategy.steps_per_epoch(run)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer = build_optimizer(run.model, recipe)  # unwrapped (prepare may wrap run.optimizer): checkpoints hold it
    run.optimizer = optimizer

    def make_scheduler(total: int):  # transformers' schedules (keel/train/schedules.py), without their imports
        return schedules.make_scheduler(optimizer, cfg.schedule, round(cfg.warmup_ratio * total), total)

    scheduler = run.scheduler = make_scheduler(total_steps)

    # -- resume -----------------------------------------------------------------------------------
    restored_rng = None
    if main:
        dropped = ckpt.clean_partial(ckpt_root)
        if dropped:
            logger.warning(f"removed {dropped} incomplete checkpoint folder(s) left by an interrupted run")
    accelerator.wait_for_everyone()
    # the newest intact checkpoint (a corrupt one is skipped and named); none at all: the run starts afresh
    # train.parallel=fsdp: sharded checkpoints, read by any number of processes (keel/train/sharded.py)
    fsdp = sharded.uses_fsdp(recipe)
    loaded = None
    if resume and fsdp:
        loaded = sharded.resume_point(ckpt_root, run.model, optimizer, recipe, rank, world, check_resume_compatible)
    elif resume:
        loaded = ckpt.resume_point(ckpt_root, run.model, recipe, rank, world, check_resume_compatible)
    if loaded is not None:
        if loaded.changed:
            logger.warning(f"resuming with changed settings: {', '.join(loaded.changed)}")
        if loaded.optimizer is not None:  # a sharded checkpoint was loaded into the optimiser in place
            optimizer.load_state_dict(loaded.optimizer)
        state = run.state = loaded.state
        if loaded.world_size not in (None, world):
            # a sharded checkpoint of another number of processes: the plan is the steps done plus those the data
            # left gives at this size, and the schedule ends with them (the optimiser's current lr is kept)
            done_in_epoch = math.ceil(state.batch_in_epoch / cfg.grad_accum_steps)
            left = max(0, steps_per_epoch - done_in_epoch) + max(0, cfg.epochs - state.epoch - 1) * steps_per_epoch
            total_steps = min(state.step + left, cfg.max_steps or state.step + left)
            lrs = [group["lr"] for group in optimizer.param_groups]
            scheduler = run.scheduler = make_scheduler(total_steps)
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr
        scheduler.load_state_dict(loaded.scheduler)
        if loaded.world_size in (None, world) and {"train.epochs", "train.max_steps"} & set(loaded.changed or ()):
            # a longer (or shorter) run: the rest of it follows the schedule planned for its new length, from this
            # step on (a finished linear schedule ended at lr 0; its optimiser would take the next step at that lr)
            lambdas = zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas)
            for group, base, fn in lambdas:
                group["lr"] = base * fn(scheduler.last_epoch)
        restored_rng = loaded.rng
        logger.info(f"resuming from {loaded.path.name} (epoch {state.epoch + 1}, step {state.step})")
    if resume:
        strategy.resumed(run, loaded)
    if resume and loaded is None:
        if (run_dir / "model").is_dir():
            raise CheckpointError(
                f"nothing to resume: {run_dir} has a final model but no checkpoint; it is finished "
                "(set output.dir to a new folder to train again)"
            )
        logger.info(
            f"nothing was checkpointed in {run_dir} yet (stopped before its first checkpoint): starting it afresh"
        )
        resume = False
    stop = strategy.start(run, total_steps)  # DP-SGD: the last step within the privacy budget
    if loaded is not None:  # finished or not by this recipe's length: a finished run given more epochs trains on
        was_finished = state.finished
        state.finished = state.stopped_early or state.step >= stop or state.epoch >= cfg.epochs
        if was_finished and not state.finished:
            logger.info(
                f"that run had finished at epoch {state.epoch}, step {state.step}: training on to epoch {cfg.epochs}"
            )
        elif state.finished:
            why = "it stopped early" if state.stopped_early else f"it is at step {state.step} of {stop}"
            logger.info(f"that run had already finished ({why}); writing its final model again")

    strategy.prepare(run)
    device = accelerator.device
    metrics = MetricLog(run_dir, enabled=main, resume_step=state.step if resume else None)
    if restored_rng is not None:
        ckpt.restore_rng(*restored_rng)  # last, after everything that draws random numbers at set-up

    metric_name = recipe.selection_metric
    higher_is_better = metric_name != "loss"
    recipe_yaml, recipe_sha = recipe.to_yaml(), recipe.sha256()

    best_saved_at: list[int] = []  # steps at which this session wrote best/ (a resumed run's may hold other weights)

    def best_weights_of(step: int) -> Path | None:
        """best/'s weights when this session saved them at this very step (an epoch end that improved): the
        checkpoint of that step links them instead of writing the same 90 MB (for MiniLM) again."""
        return ckpt_root / "best" / "model.safetensors" if best_saved_at[-1:] == [step] else None

    def save() -> None:
        state.extra.update(strategy.checkpoint_extra(run))
        rngs = gather_object([ckpt.capture_rng()])
        if fsdp:  # every process writes its own shards
            sharded.save_checkpoint(
                ckpt_root, run.model, optimizer, scheduler, state, recipe_yaml, recipe_sha, rngs, main
            )
        elif main:
            ckpt.save_checkpoint(
                ckpt_root,
                accelerator.unwrap_model(run.model),
                optimizer,
                scheduler,
                state,
                recipe_yaml,
                recipe_sha,
                rngs,
                weights_from=best_weights_of(state.step),
            )
        if main:
            ckpt.prune_checkpoints(ckpt_root, cfg.keep_last_k)
        accelerator.wait_for_everyone()
        for listener in CHECKPOINT_LISTENERS:
            listener(ckpt.step_dir(ckpt_root, state.step))

    def evaluate_epoch(epoch: int) -> None:
        if len(val_ds) == 0:
            return
        result = task.evaluate(
            accelerator.unwrap_model(run.model), val_ds, tokenizer, cfg.eval_batch_size, device, accelerator.autocast
        )
        run.model.train()
        value = result[metric_name]
        record = {
            "split": "validation",
            "step": state.step,
            "epoch": epoch + 1,
            **{k: v for k, v in result.items() if isinstance(v, (int, float))},
        }
        metrics.write(record)
        improved = state.best_metric is None or (
            value > state.best_metric + _min_delta(cfg)
            if higher_is_better
            else value < state.best_metric - _min_delta(cfg)
        )
        if improved:
            state.best_metric, state.best_step, state.evals_without_improvement = float(value), state.step, 0
            whole = sharded.full_state_dict(run.model) if sharded.is_sharded(run.model) else None  # every process
            if main:
                with atomic_dir(ckpt_root / "best") as tmp:
                    from safetensors.torch import save_file, save_model

                    if whole is not None:
                        save_file(whole, str(tmp / "model.safetensors"))
                    else:
                        save_model(accelerator.unwrap_model(run.model), str(tmp / "model.safetensors"))
                    (tmp / "info.json").write_text(json.dumps({"step": state.step, metric_name: value}))
                best_saved_at.append(state.step)
        else:
            state.evals_without_improvement += 1
        accelerator.wait_for_everyone()
        shown = ", ".join(f"{k} {result[k]:.4f}" for k in ("loss", "accuracy", "macro_f1", "perplexity") if k in result)
        logger.info(f"epoch {epoch + 1}: validation {shown}" + (" (best)" if improved else ""))

    # -- the loop ---------------------------------------------------------------------------------
    run.model.train()
    t0, samples_at_start, step_at_start = time.perf_counter(), state.samples_seen, state.step
    with progress("step") as bar:
        task_id = bar.add_task(strategy.label, total=stop, completed=min(state.step, stop), info="")
        while not state.finished and state.epoch < cfg.epochs:
            epoch = state.epoch
            items = strategy.epoch_items(run, epoch)  # what is left of this epoch: one item per optimiser step
            for i, item in enumerate(items):
                if state.step >= stop:
                    break
                result = strategy.step(run, item)
                scheduler.step()
                state.step, state.batch_in_epoch = state.step + 1, state.batch_in_epoch + result.batches
                state.samples_seen += result.samples
                record = {
                    "step": state.step,
                    "epoch": epoch + 1,
                    "loss": result.loss,
                    "lr": scheduler.get_last_lr()[0],
                    "samples": state.samples_seen,
                    "seconds": round(time.perf_counter() - t0, 4),
                    **result.record,
                }
                metrics.write(record)
                bar.update(task_id, completed=state.step, info=f"epoch {epoch + 1}/{cfg.epochs} loss {result.loss:.4f}")
                epoch_done = i == len(items) - 1 or state.step >= stop
                if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and not epoch_done:
                    save()
            # epoch end (or max_steps, or the privacy budget): evaluate, pick the best, maybe stop, checkpoint
            evaluate_epoch(epoch)
            state.epoch, state.batch_in_epoch = strategy.epoch_after(run, epoch), 0
            if cfg.early_stopping and state.evals_without_improvement >= cfg.early_stopping.patience:
                state.stopped_early = True
                logger.info(
                    f"early stopping: no improvement in {metric_name} for {state.evals_without_improvement} evaluations"
                )
            state.finished = state.stopped_early or state.step >= stop or state.epoch >= cfg.epochs
            save()
    elapsed = time.perf_counter() - t0

    # -- the final model --------------------------------------------------------------------------
    final = accelerator.unwrap_model(run.model)
    best = ckpt_root / "best"
    # the loop ends with an evaluation: when that was the best one, the weights in memory are best/'s already
    if (best / "manifest.json").is_file() and state.best_step != state.step:
        from safetensors.torch import load_file, load_model

        verify_manifest(best)
        if sharded.is_sharded(final):
            sharded.load_full_state_dict(final, load_file(str(best / "model.safetensors")))
        else:
            load_model(final, str(best / "model.safetensors"))
    # FSDP: the whole weights, gathered on the main process (the shards differ by design: no replica check)
    whole = sharded.full_state_dict(final) if sharded.is_sharded(final) else None
    fingerprints = gather_object([param_fingerprint(final) if whole is None and world > 1 else None])
    summary = {
        "steps": state.step,
        "epochs_done": state.epoch,
        "stopped_early": state.stopped_early,
        "best_step": state.best_step,
        "best_metric": state.best_metric,
        "selection_metric": metric_name,
        "train_seconds_this_session": round(elapsed, 2),
        "samples_per_second": round((state.samples_seen - samples_at_start) / elapsed, 2) if elapsed > 0 else None,
        "seconds_per_step": round(elapsed / max(1, state.step - step_at_start), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "world_size": world,
        "labels": data.labels,
        "data": data.meta,
    }
    strategy.finish(run, summary)
    if main:
        if world > 1 and whole is None:
            same = len(set(fingerprints)) == 1
            atomic_write_json(
                run_dir / "replicas.json", {"world_size": world, "sha256": fingerprints, "identical": same}
            )
            if not same:
                raise KeelError(f"data-parallel replicas diverged ({world} processes); see {run_dir / 'replicas.json'}")
        save_final_model(final, tokenizer, run_dir / "model", recipe, summary, model_info, state_dict=whole)
        atomic_write_json(run_dir / "train.json", summary)
    metrics.close()
    accelerator.wait_for_everyone()
    # Free the DDP wrapper (its gradient reducer holds the process group) while every process is still here,
    # then tear the group down together: a gloo group freed after a peer has exited can hang on exit.
    del model
    run.model = run.optimizer = optimizer = None
    accelerator.free_memory()  # one full collection: what the first call's lazy imports left in cycles goes
    if world > 1:
        gc.collect()  # the DDP wrapper, out of accelerate's lists now, with its reducer
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _min_delta(cfg) -> float:
    return cfg.early_stopping.min_delta if cfg.early_stopping else 0.0


def save_final_model(
    model, tokenizer, folder: Path, recipe: Recipe, summary: dict, extra: dict | None = None, state_dict=None
) -> None:
    """Hugging Face format (safetensors + tokenizer), plus keel.json; sealed with a manifest. ``state_dict``: the
    whole weights when ``model`` holds only this process's shards (FSDP)."""
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        (tmp / "keel.json").write_text(
            json.dumps(
                {
                    "task": recipe.task,
                    "labels": summary["labels"],
                    "recipe_sha256": recipe.sha256(),
                    "base_model": recipe.model.name,
                    "best_step": summary["best_step"],
                    "selection_metric": summary["selection_metric"],
                    "best_metric": summary["best_metric"],
                    **(extra or {}),
                    "recipe": recipe.model_dump(mode="json"),  # sealed: it decides how the model is run (keel.evaluate)
                },
                indent=2,
            )
        )
