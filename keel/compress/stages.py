"""The compression stages of a run, in order: distill -> prune -> quantize/export -> bench -> pick.

Each training stage is a small run directory of its own inside the teacher's, trained by keel's engine
(progress bar, evaluation, best model, checkpoints) and swapped into place only when complete:

    runs/<name>/compress/student/   model/ recipe.yaml metrics.jsonl train.json [export/onnx*/]
    runs/<name>/compress/pruned/    the same; its model/keel.json says "resized" when matrices shrank
    runs/<name>/compress/deployable.json   the variant picked within compress.budget

The stage names, their folders and the variant names (``pruned-onnx-int8``) are keel/rundir.py's.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from keel.errors import KeelError
from keel.io import atomic_dir, atomic_write_text, writes_run
from keel.recipe import CompressConfig, Recipe, load_recipe
from keel.rundir import latest_stage, stage_dir

logger = logging.getLogger(__name__)


def run_recipe(run_dir: Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise KeelError(f"{run_dir} is not a keel run directory (no recipe.yaml); pass the folder `keel run` printed")
    return load_recipe(path, overrides)


def compress_config(recipe: Recipe) -> CompressConfig:
    return recipe.compress or CompressConfig()


def _stage_recipe(recipe: Recipe, epochs: int, lr: float, max_steps: int | None) -> Recipe:
    train = recipe.train.model_copy(
        update={"epochs": epochs, "lr": lr, "max_steps": max_steps, "early_stopping": None, "checkpoint_every": 0}
    )
    update = {"train": train, "output": recipe.output.model_copy(update={"dir": None})}
    transfer = _transfer_samples(recipe)
    if transfer:  # a larger slice of the same shuffled training split: the teacher's texts and more
        update["data"] = recipe.data.model_copy(update={"max_train_samples": transfer})
    return recipe.model_copy(update=update)


def _transfer_samples(recipe: Recipe) -> int | None:
    d = compress_config(recipe).distill
    return d.transfer_samples if d else None


def _alpha(recipe: Recipe, alpha: float) -> float:
    """With a transfer set the students learn from the teacher alone: labels beyond the teacher's are not used."""
    return 0.0 if _transfer_samples(recipe) else alpha


def _train_stage(
    run_dir: Path, stage: str, recipe: Recipe, build_model, loss_fn, info: dict, train_it: bool = True, splits=None
) -> Path:
    """Train into a scratch folder next to the stage's, then swap it in: a failed stage leaves the old one.

    ``splits`` (a transfer set, keel/compress/transfer.py) are frozen in the stage's folder and trained on."""
    from keel.train.engine import save_final_model, train

    final = stage_dir(run_dir, stage)
    with atomic_dir(final) as work:
        atomic_write_text(work / "recipe.yaml", recipe.to_yaml())
        if splits is not None and train_it:
            from keel.data.splits import freeze

            freeze(work, splits)
        if train_it:
            summary = train(recipe, work, build_model=build_model, loss_fn=loss_fn, model_info={"stage": stage, **info})
            shutil.rmtree(work / "checkpoints", ignore_errors=True)  # the stage is complete; its model/ is what counts
        else:
            from keel.runtime.load import load_trained

            teacher = load_trained(run_dir)
            labels = teacher.info.get("labels") or []
            summary = {
                "labels": labels,
                "best_step": None,
                "selection_metric": recipe.selection_metric,
                "best_metric": None,
            }
            save_final_model(
                build_model(None, labels), teacher.tokenizer, work / "model", recipe, summary, {"stage": stage, **info}
            )
    if summary["best_metric"] is not None:
        logger.info(f"{stage}: best validation {summary['selection_metric']} {summary['best_metric']:.4f} -> {final}")
    return final


def _teacher(run_dir: Path):
    from keel.runtime.load import load_trained

    return load_trained(run_dir).model.float().eval()


def _distiller(
    run_dir: Path, recipe: Recipe, cfg_alpha: float, temperature: float, hidden_weight: float, layer_map=None
):
    from keel.compress.distill import Distiller

    return Distiller(
        _teacher(run_dir), cfg_alpha, temperature, hidden_weight, layer_map, causal=recipe.task == "causal-lm"
    )


@writes_run
def distill(run_dir: str | Path, recipe: Recipe | None = None) -> Path:
    """Teacher (RUN_DIR/model) -> RUN_DIR/compress/student."""
    from keel.secure.seal import refuse_plain_outputs

    refuse_plain_outputs(run_dir, "distill")
    from keel.compress.distill import check_smaller, layer_list, pick_layers, student_from_teacher
    from keel.compress.transfer import transfer_splits
    from keel.models import model_dir
    from keel.tasks import get_task

    run_dir = Path(run_dir)
    recipe = recipe or run_recipe(run_dir)
    cfg = compress_config(recipe).distill
    if cfg is None:
        from keel.recipe import DistillConfig

        cfg = DistillConfig()
    teacher = _teacher(run_dir)
    layers, layer_map = None, None
    if cfg.student is None:
        layers = pick_layers(len(layer_list(teacher)), cfg.layers)
        layer_map = layers
        logger.info(f"distill: student keeps teacher layers {layers} of {len(layer_list(teacher))}")
        student = student_from_teacher(teacher, layers)
    else:  # the recipe schema refuses student and layers together
        student = get_task(recipe.task).build_model(
            model_dir(cfg.student), list(teacher.config.id2label.values()) if recipe.task == "classification" else []
        )
        if student.get_input_embeddings().num_embeddings < teacher.get_input_embeddings().num_embeddings:
            raise KeelError(
                f"student {cfg.student} has a smaller vocabulary than the teacher; a student must share the "
                "teacher's tokenizer (or leave compress.distill.student unset to cut one from the teacher)"
            )
        logger.info(f"distill: student {cfg.student}")
    check_smaller(student, teacher)
    loss = _distiller(run_dir, recipe, _alpha(recipe, cfg.alpha), cfg.temperature, cfg.hidden_weight, layer_map)
    stage_recipe = _stage_recipe(recipe, max(cfg.epochs, 1), cfg.lr, cfg.max_steps)
    splits = transfer_splits(run_dir, stage_recipe) if cfg.epochs > 0 else None
    info = {
        "distilled_from": str(run_dir),
        "teacher_layers_kept": layers,
        "trained": cfg.epochs > 0,
        "distill": cfg.model_dump(mode="json"),
    }
    return _train_stage(
        run_dir, "student", stage_recipe, lambda path, labels: student, loss, info, cfg.epochs > 0, splits
    )


@writes_run
def prune(run_dir: str | Path, recipe: Recipe | None = None) -> Path:
    """The latest model (student if any, else teacher) -> RUN_DIR/compress/pruned."""
    from keel.secure.seal import refuse_plain_outputs

    refuse_plain_outputs(run_dir, "prune")
    from keel.compress import prune as P
    from keel.compress.transfer import transfer_splits
    from keel.recipe import PruneConfig
    from keel.runtime.load import load_trained

    run_dir = Path(run_dir)
    recipe = recipe or run_recipe(run_dir)
    cfg = compress_config(recipe).prune or PruneConfig(ffn=0.5)  # the schema refuses a prune that removes nothing
    source = (
        latest_stage(run_dir)
        if latest_stage(run_dir) != "pruned"
        else ("student" if (stage_dir(run_dir, "student") / "model").is_dir() else "teacher")
    )
    model = load_trained(stage_dir(run_dir, source)).model.float()
    before = sum(p.numel() for p in model.parameters())
    info: dict = {"pruned_from": source, "trained": cfg.finetune_epochs > 0}
    if cfg.heads or cfg.ffn:
        info["structured"] = P.structured_prune(model, cfg.heads, cfg.ffn)
        info["resized"] = True
    stage_recipe = _stage_recipe(recipe, max(cfg.finetune_epochs, 1), cfg.lr, cfg.max_steps)
    splits = transfer_splits(run_dir, stage_recipe) if cfg.finetune_epochs > 0 else None
    if cfg.vocab:
        from keel.data.prepare import prepare_data

        tok = load_trained(run_dir).tokenizer
        if splits is not None:  # the tokens of the texts the stage trains on
            train_ids = tok(list(splits.train["text"]), truncation=True, max_length=recipe.model.max_length)
            train_ids = train_ids["input_ids"]
        else:
            train_ids = prepare_data(stage_recipe, tok, run_dir).splits["train"]["input_ids"]
        seen = {i for ids in train_ids for i in ids}
        info["vocab"] = P.trim_vocabulary(
            model,
            seen | set(tok.all_special_ids),
            tok.unk_token_id if tok.unk_token_id is not None else tok.pad_token_id,
        )
        info["resized"] = True
        logger.info(
            f"prune: embeddings keep {info['vocab']['tokens_kept']:,} of {info['vocab']['tokens_before']:,} tokens "
            "(those in the training split)"
        )
    if cfg.sparsity:
        info["unstructured"] = P.global_magnitude_prune(model, cfg.sparsity)
    after = sum(p.numel() for p in model.parameters())
    info["params_before"], info["params_after"] = before, after
    logger.info(
        f"prune ({source}): {before:,} -> {after:,} parameters"
        + (f", {info['unstructured']['sparsity']:.1%} of block weights zero" if cfg.sparsity else "")
    )

    def build(path, labels):
        if cfg.sparsity:
            P.keep_zeros(model)
        return model

    loss = None
    if (run_dir / "model").is_dir():  # recover with the teacher's help
        d = compress_config(recipe).distill
        loss = _distiller(run_dir, recipe, _alpha(recipe, d.alpha if d else 0.5), d.temperature if d else 2.0, 0.0)
    final = _train_stage(run_dir, "pruned", stage_recipe, build, loss, info, cfg.finetune_epochs > 0, splits)
    if cfg.sparsity:
        got = P.measured_sparsity(load_trained(final).model)
        logger.info(f"prune: {got:.2%} of block weights are zero after fine-tuning and reloading")
    return final


@writes_run
def quantize(run_dir: str | Path, recipe: Recipe | None = None, stage: str | None = None) -> list[str]:
    """ONNX fp32 / int8 / static int8 exports of the latest stage; returns the variant names produced."""
    from keel.secure.seal import refuse_plain_outputs

    refuse_plain_outputs(run_dir, "quantize")
    from keel.export.onnx import export_onnx, quantize_static_int8

    run_dir = Path(run_dir)
    recipe = recipe or run_recipe(run_dir)
    q = compress_config(recipe).quantize
    stage = stage or latest_stage(run_dir)
    folder = stage_dir(run_dir, stage)
    produced = []
    onnx_fields = {"onnx", "onnx_int8", "onnx_static_int8"}
    if recipe.task != "classification":
        if any(getattr(q, f) for f in onnx_fields & q.model_fields_set):
            raise KeelError(
                "ONNX export covers classifiers; for causal LMs use compress.quantize.torch_int8 "
                "(torchao weight-only) and leave the onnx fields unset"
            )
        mode = q.torch_int8 if "torch_int8" in q.model_fields_set else "weight-only"
        return [f"{stage}-torchao-{mode}"] if mode != "none" else []
    if q.onnx or q.onnx_int8 or q.onnx_static_int8:
        result = export_onnx(folder, int8=q.onnx_int8)
        produced += [f"{stage}-onnx"] + ([f"{stage}-onnx-int8"] if q.onnx_int8 else [])
        logger.info(f"export ({stage}): ONNX fp32 max |diff| vs eager {result['onnx']['max_abs_diff_vs_eager']:.1e}")
        if q.onnx_static_int8:
            try:
                res = quantize_static_int8(folder, q.calibration_samples)
            except KeelError as e:  # this model does not take static int8 well: bench the others, say why
                logger.info(f"export ({stage}): static int8 left out: {e}")
            else:
                produced.append(f"{stage}-onnx-static-int8")
                logger.info(f"export ({stage}): static int8 logit cosine {res['logit_cosine_vs_eager']:.4f}")
    if q.torch_int8 != "none":
        produced.append(f"{stage}-torchao-{q.torch_int8}")
    return produced


@writes_run
def compress(run_dir: str | Path, overrides: list[str] | None = None) -> dict:
    """Every stage the recipe's compress section asks for, then the bench and the budgeted pick."""
    from keel.compress.budget import pick_deployable
    from keel.export.bench import bench

    run_dir = Path(run_dir)
    recipe = run_recipe(run_dir, overrides)
    if not (run_dir / "model" / "manifest.json").is_file():
        raise KeelError(
            f"{run_dir} has no final model to compress; finish training first (`keel train RECIPE --resume`)"
        )
    cfg = compress_config(recipe)
    if recipe.task != "classification":
        raise KeelError(
            "keel compress (bench and budget) covers classifiers; for a causal LM run `keel distill` and "
            "`keel prune`, then compare perplexities with `keel eval RUN_DIR --backend student-torch` "
            "(or pruned-torch, teacher-torchao-weight-only)"
        )
    if cfg.distill:
        distill(run_dir, recipe)
    if cfg.prune:
        prune(run_dir, recipe)
    variants = ["teacher-torch"]
    for stage in ("student", "pruned"):
        info = stage_dir(run_dir, stage) / "model" / "keel.json"
        if info.is_file() and json.loads(info.read_text()).get("trained", True):  # an untrained cut is not a candidate
            variants.append(f"{stage}-torch")
    variants += quantize(run_dir, recipe)
    if cfg.quantize.teacher and latest_stage(run_dir) != "teacher":
        variants += quantize(run_dir, recipe, stage="teacher")
    result = bench(
        run_dir,
        n_latency=cfg.bench_latency_samples,
        n_eval=cfg.bench_eval_samples,
        variants=variants,
        rounds=cfg.bench_rounds,
    )
    return pick_deployable(run_dir, result, cfg.budget)
