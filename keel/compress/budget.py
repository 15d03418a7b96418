"""The budgeted pick: of every variant measured by `keel bench`, the one to deploy.

A variant is within budget when its validation accuracy is at most ``max_accuracy_drop`` points below the
fp32 teacher's (measured in the same bench, through the plain Hugging Face pipeline), and, when set, its p50
latency at batch 1 and its size on disk are under the caps. Among those, ``prefer`` decides: lowest
latency (default), smallest size, or highest throughput. None within budget is an error (exit 3), with
the closest misses named, so a pipeline cannot ship a model that lost too much.

The pick sees validation figures only. The chosen variant alone is then scored once on the test split (as
`keel eval --backend VARIANT` does), next to the teacher's own test figures: picking the best of many variants
on the split that reports them would flatter the winner by about the split's noise (on 500 examples, some
+-2 points against a 1-point budget). A test drop beyond the budget is reported, not re-picked on.
"""

from __future__ import annotations

import logging
from pathlib import Path

from keel.errors import GateError, RecipeError
from keel.io import atomic_write_json
from keel.rundir import deployable_file

logger = logging.getLogger(__name__)

_SORT = {
    "latency": lambda r: (r["p50_ms_batch1"], r["disk_mb"]),
    "size": lambda r: (r["disk_mb"], r["p50_ms_batch1"]),
    "throughput": lambda r: (-r["throughput_batch32"], r["disk_mb"]),
}


def check_compress_recipe(recipe) -> None:
    """What `keel run` needs to compress after training, checked before it trains (`keel validate` too)."""
    if recipe.task != "classification":
        raise RecipeError(
            "keel run compresses classifiers only (bench and budget); for a causal LM remove the "
            "compress: section and run `keel distill RUN_DIR` / `keel prune RUN_DIR` after training"
        )
    if recipe.data.split.validation == 0:
        raise RecipeError(
            "compress: the variants are measured and picked on the validation split, and "
            "data.split.validation is 0; set it above 0 (e.g. data.split.validation=0.1)"
        )
    student = recipe.compress.distill.student if recipe.compress.distill else None
    if student is not None:
        from keel.models.registry import resolve_model

        try:
            resolve_model(student)
        except RecipeError as e:
            raise RecipeError(str(e).replace("model.name", "compress.distill.student", 1)) from None


def versus_teacher(drop_points: float, places: int = 1) -> str:
    """How a variant's accuracy compares with the teacher's, in words: '0.4 points below the teacher'."""
    if round(drop_points, places) == 0:
        return "as accurate as the teacher"
    side = "below" if drop_points > 0 else "above"
    return f"{abs(drop_points):.{places}f} points {side} the teacher"


def misses(row: dict, budget) -> list[str]:
    """Why a variant is outside the budget (empty when it is within)."""
    out = []
    if row["accuracy_drop_points"] > budget.max_accuracy_drop + 1e-9:
        out.append(f"accuracy drop {row['accuracy_drop_points']:.2f} > {budget.max_accuracy_drop:g} points")
    if budget.max_latency_ms is not None and row["p50_ms_batch1"] > budget.max_latency_ms:
        out.append(f"p50 {row['p50_ms_batch1']:.2f} > {budget.max_latency_ms:g} ms")
    if budget.max_size_mb is not None and row["disk_mb"] > budget.max_size_mb:
        out.append(f"size {row['disk_mb']:.1f} > {budget.max_size_mb:g} MB")
    return out


def select(rows: list[dict], budget) -> tuple[dict | None, dict[str, list[str]]]:
    """(the chosen row or None, why each other candidate was out). The HF-pipeline baseline is not a candidate."""
    candidates = [r for r in rows if r["variant"] != "hf-pipeline"]
    why = {r["variant"]: misses(r, budget) for r in candidates}
    fits = [r for r in candidates if not why[r["variant"]]]
    return (min(fits, key=_SORT[budget.prefer]) if fits else None), why


def test_figures(run_dir: Path, variant: str) -> dict:
    """The chosen variant's accuracy on the test split, scored once, against the teacher's on the same split."""
    import json

    from keel.evaluate import evaluate_run

    got = evaluate_run(run_dir, backend=variant)
    teacher_file = run_dir / "eval" / "test.json"  # `keel run` wrote it after training; the teacher does not change
    teacher = json.loads(teacher_file.read_text()) if teacher_file.is_file() else evaluate_run(run_dir)
    return {
        "split": "test",
        "n": got["n"],
        "accuracy": got["accuracy"],
        "macro_f1": got["macro_f1"],
        "teacher_accuracy": teacher["accuracy"],
        "teacher_macro_f1": teacher["macro_f1"],
        "accuracy_drop_points": (teacher["accuracy"] - got["accuracy"]) * 100,
    }


def pick_deployable(run_dir: str | Path, bench_result: dict, budget) -> dict:
    """Mark the deployable variant in RUN_DIR/compress/deployable.json (picked on validation figures, then scored
    once on the test split); raise GateError when none fits."""
    run_dir = Path(run_dir)
    chosen, why = select(bench_result["variants"], budget)
    record = {
        "budget": budget.model_dump(mode="json"),
        "deployable": chosen["variant"] if chosen else None,
        "picked_on": bench_result.get("split", "validation"),
        "outside_budget": {k: v for k, v in why.items() if v},
    }
    if chosen:
        record["figures"] = chosen
        record["test"] = test_figures(run_dir, chosen["variant"])
    atomic_write_json(deployable_file(run_dir), record)
    if chosen is None:
        closest = min(bench_result["variants"][1:], key=lambda r: r["accuracy_drop_points"], default=None)
        hint = f"; closest: {closest['variant']} ({', '.join(why[closest['variant']])})" if closest else ""
        raise GateError(
            f"no compressed variant is within compress.budget{hint}; relax the budget "
            "(e.g. compress.budget.max_accuracy_drop=2) or compress less (fewer pruned heads/neurons, "
            "more student layers)"
        )
    test = record["test"]
    logger.info(
        f"deployable: {chosen['variant']} (picked on validation: accuracy {chosen['accuracy']:.4f}, "
        f"{chosen['accuracy_drop_points']:+.2f} points drop, p50 {chosen['p50_ms_batch1']:.2f} ms, "
        f"{chosen['disk_mb']:.1f} MB; test: accuracy {test['accuracy']:.4f}, {test['accuracy_drop_points']:+.2f} points)"
    )
    if test["accuracy_drop_points"] > budget.max_accuracy_drop + 1e-9:
        logger.warning(
            f"on the test split the deployable variant is {test['accuracy_drop_points']:.2f} points below the teacher, "
            f"beyond compress.budget.max_accuracy_drop ({budget.max_accuracy_drop:g}); it was picked on validation, so "
            "this is an honest estimate: more validation examples (compress.bench_eval_samples) make the pick surer"
        )
    return record
