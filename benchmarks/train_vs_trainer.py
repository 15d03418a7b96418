"""`keel train` against HF `Trainer` on the same tokenized data and settings, each round in a fresh process.

Both sides get the recipe's tokenized train and validation splits (one tokenization, keel's), the same model, batch
size, learning rate, schedule and warm-up, weight decay, gradient clipping, epochs, seed and length-grouped batches,
and do the same work: load the model, train, evaluate on the validation split and checkpoint (model + optimiser +
RNG) at each epoch end, load the best model at the end and save the final model with its tokenizer. keel runs as
the CLI does (`keel train RECIPE output.dir=...`: deterministic kernels, exact resume, sealed and fsynced safetensors
checkpoints, a metrics line per step); Trainer with its defaults otherwise (fused AdamW, no deterministic mode, a log
line every 500 steps, checkpoints neither hashed nor fsynced). The length-grouped orders come from different seeded
generators, so the batches are alike, not identical (benchmarks/train_step_profile.py compares identical ones).

Every round of each tool is its own process (keel, Trainer, Trainer, keel, ...), so both pay the same first-use
costs (imports, CPU kernels planned per batch shape) and neither warms the other up. Per round:

    loop_seconds     each tool's own training timer, the same work on both sides: the steps, the evaluation and the
                     checkpoint of each epoch (optimiser and schedule built before it, the best model loaded after)
    data_seconds     keel: the engine's data preparation (splits frozen into the run, tokenized cache read);
                     Trainer: reading the tokenized splits keel made (it neither splits nor tokenizes: the process
                     figure flatters it by about keel's data seconds)
    process_seconds  the whole process: `keel train` as a user runs it (imports, run directory, data, model, loop,
                     final model, environment record) and the Trainer script (imports, data, model, train, save)

    python benchmarks/train_vs_trainer.py                    # the quickstart recipe, 2 rounds each
    python benchmarks/train_vs_trainer.py --rounds 3 train.epochs=1
    python benchmarks/train_vs_trainer.py --quick            # a smoke run on a tiny random model

Prints a table and writes benchmarks/results/train_vs_trainer.json (``--out`` elsewhere). Ratios = Trainer's seconds
over keel's, best round of each (>= 1.0: keel is no slower); the headline is the loop's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).parent / "results"
QUICK = [
    "model.name=tiny-bert",
    "model.max_length=32",
    "data.max_train_samples=64",
    "data.max_eval_samples=32",
    "train.epochs=1",
    "train.batch_size=8",
]
CLOCKS = ("loop_seconds", "process_seconds")


def keel_worker(recipe_name: str, overrides: list[str], work: Path) -> dict:
    """`keel train RECIPE output.dir=WORK/keel-run` in this process, the engine's data preparation timed."""
    from keel import cli
    from keel.train import engine

    timed = {"data": 0.0}
    prepare = engine.prepare_data

    def timed_prepare(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return prepare(*args, **kwargs)
        finally:
            timed["data"] += time.perf_counter() - t0

    run_dir = work / "keel-run"
    engine.prepare_data = timed_prepare
    sys.argv = ["keel", "train", recipe_name, *overrides, f"output.dir={run_dir}"]
    try:
        cli.main()
    finally:
        engine.prepare_data = prepare
    summary = json.loads((run_dir / "train.json").read_text())
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "loop_seconds": summary["train_seconds_this_session"],
        "data_seconds": round(timed["data"], 2),
        "steps": summary["steps"],
        "samples": max(r["samples"] for r in steps if "split" not in r),
        "best_metric": summary["best_metric"],
    }


def trainer_worker(recipe, data_dir: Path, work: Path) -> dict:
    """The Trainer script: the tokenized splits, the model, train (evaluate, checkpoint, best model), save."""
    import datasets
    import numpy as np
    import torch
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )
    from transformers.utils import logging as hf_logging

    from keel.models import model_dir

    hf_logging.set_verbosity_error()  # "some weights newly initialized" is the point of fine-tuning
    cfg, metric = recipe.train, recipe.selection_metric
    t0 = time.perf_counter()
    labels = json.loads((data_dir / "labels.json").read_text())
    train_ds, val_ds = (datasets.load_from_disk(str(data_dir / "tokenized" / s)) for s in ("train", "validation"))
    keep = [c for c in ("input_ids", "token_type_ids", "attention_mask", "label") if c in train_ds.column_names]
    train_ds, val_ds = train_ds.select_columns(keep), val_ds.select_columns(keep)
    data_seconds = time.perf_counter() - t0

    set_seed(cfg.seed)
    path = model_dir(recipe.model.name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        local_files_only=True,
        use_safetensors=True,
    )
    steps = -(-len(train_ds) // cfg.batch_size) * cfg.epochs
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)

    def compute_metrics(pred):
        y_pred = np.asarray(pred.predictions).argmax(-1)
        return {
            "accuracy": accuracy_score(pred.label_ids, y_pred),
            "macro_f1": f1_score(pred.label_ids, y_pred, average="macro", zero_division=0),
        }

    args = TrainingArguments(
        output_dir=str(work / "trainer-run"),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        warmup_steps=round(cfg.warmup_ratio * steps),
        lr_scheduler_type="constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm or 0.0,
        seed=cfg.seed,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        gradient_accumulation_steps=cfg.grad_accum_steps,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=cfg.keep_last_k,
        load_best_model_at_end=True,
        metric_for_best_model=metric,
        greater_is_better=metric != "loss",
        report_to=[],
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )
    out = trainer.train()
    trainer.save_model(str(work / "trainer-model"))  # the final model, as keel's RUN/model
    tokenizer.save_pretrained(str(work / "trainer-model"))
    return {
        "loop_seconds": round(out.metrics["train_runtime"], 2),
        "data_seconds": round(data_seconds, 2),
        "steps": out.global_step,
        "samples": min(len(train_ds) * cfg.epochs, out.global_step * cfg.batch_size),
        "best_metric": trainer.state.best_metric,
    }


def worker(args, overrides: list[str]) -> None:
    from keel.io import atomic_write_json

    work = Path(args.work)
    if args.worker == "keel":
        row = keel_worker(args.recipe, overrides, work)
    else:
        from keel.recipe import load_recipe

        row = trainer_worker(load_recipe(args.recipe, overrides), work.parent / "data", work)
    atomic_write_json(work / "row.json", row)


def run_round(tool: str, args, overrides: list[str], tmp: Path, r: int) -> dict:
    work = tmp / f"{tool}-{r}"
    work.mkdir()
    script = Path(__file__).resolve()
    cmd = [sys.executable, str(script), "--worker", tool, "--work", str(work), "--recipe", args.recipe]
    root = str(script.parent.parent)  # keel from this checkout, run from the round's own folder
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (root, os.environ.get("PYTHONPATH")) if x)}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*cmd, *overrides], cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"train_vs_trainer: the {tool} round failed:\n{proc.stderr[-3000:]}")
    row = {"round": r, "tool": tool, **json.loads((work / "row.json").read_text()), "process_seconds": round(wall, 2)}
    row["samples_per_second"] = round(row["samples"] / row["loop_seconds"], 2)
    row["load_average_1min"] = round(os.getloadavg()[0], 2)
    import shutil

    shutil.rmtree(work, ignore_errors=True)  # a round's run and checkpoints: about 0.5 GB for MiniLM
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="quickstart")
    p.add_argument(
        "--rounds", type=int, default=2, help="rounds per tool, alternating (keel, Trainer, Trainer, keel, ...)"
    )
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny random model, 64 examples, 1 round")
    p.add_argument("--out", type=Path, default=RESULTS / "train_vs_trainer.json")
    p.add_argument("--worker", choices=("keel", "trainer"), help=argparse.SUPPRESS)  # one round, in its own process
    p.add_argument("--work", help=argparse.SUPPRESS)
    args, overrides = p.parse_known_args()
    overrides = [x for x in overrides if x != "--"]
    if args.worker:
        return worker(args, overrides)
    if args.quick:
        overrides, args.rounds = QUICK + overrides, 1

    import torch
    import transformers
    from transformers import AutoTokenizer

    from keel.data.prepare import prepare_data
    from keel.io import atomic_write_json
    from keel.models import model_dir
    from keel.recipe import load_recipe

    recipe = load_recipe(args.recipe, overrides)
    if recipe.task != "classification" or recipe.train.privacy is not None:
        sys.exit("train_vs_trainer: a classification recipe without train.privacy, please")
    tokenizer = AutoTokenizer.from_pretrained(model_dir(recipe.model.name))
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = prepare_data(recipe, tokenizer, tmp / "splits", freeze=True)  # fills keel's tokenized cache too
        for split in ("train", "validation"):
            data.splits[split].save_to_disk(str(tmp / "data" / "tokenized" / split))
        (tmp / "data" / "labels.json").write_text(json.dumps(data.labels))
        for r in range(1, args.rounds + 1):
            for tool in ("keel", "trainer") if r % 2 else ("trainer", "keel"):
                row = run_round(tool, args, overrides, tmp, r)
                print(
                    f"round {r} {tool}: loop {row['loop_seconds']} s, data {row['data_seconds']} s, "
                    f"process {row['process_seconds']} s (load {row['load_average_1min']})",
                    file=sys.stderr,
                    flush=True,
                )
                rounds.append(row)

    def best(tool: str, clock: str) -> float:
        return min(x[clock] for x in rounds if x["tool"] == tool)

    ratios = {clock: round(best("trainer", clock) / best("keel", clock), 3) for clock in CLOCKS}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    print(
        f"\n`keel train` vs HF Trainer on {device} (torch {torch.__version__}, transformers {transformers.__version__}), "
        f"{recipe.model.name}, batch {recipe.train.batch_size}, {recipe.train.epochs} epoch(s), "
        f"group_by_length={recipe.train.group_by_length}, one process per round"
    )
    print(
        f"{'round':>5}  {'tool':<8}{'loop s':>9}{'data s':>8}{'process s':>11}{'steps':>7}"
        f"{'best ' + recipe.selection_metric:>16}{'load':>6}"
    )
    for x in rounds:
        print(
            f"{x['round']:>5}  {x['tool']:<8}{x['loop_seconds']:>9.1f}{x['data_seconds']:>8.1f}"
            f"{x['process_seconds']:>11.1f}{x['steps']:>7}"
            f"{x['best_metric'] if x['best_metric'] is not None else float('nan'):>16.4f}{x['load_average_1min']:>6.1f}"
        )
    print(
        f"ratio Trainer / keel seconds (best round each): loop {ratios['loop_seconds']:.3f}x (goal >= 1.0), "
        f"whole process {ratios['process_seconds']:.3f}x"
    )
    doc = {
        "benchmark": "train_vs_trainer",
        "command": " ".join(["benchmarks/train_vs_trainer.py", *sys.argv[1:]]),
        "recipe": args.recipe,
        "overrides": overrides,
        "quick": args.quick,
        "device": device,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "rounds": rounds,
        **{f"keel_{clock}": best("keel", clock) for clock in CLOCKS},
        **{f"trainer_{clock}": best("trainer", clock) for clock in CLOCKS},
        "keel_samples_per_second": max(x["samples_per_second"] for x in rounds if x["tool"] == "keel"),
        "trainer_samples_per_second": max(x["samples_per_second"] for x in rounds if x["tool"] == "trainer"),
        "ratio": ratios["loop_seconds"],
        "ratio_process": ratios["process_seconds"],
        "goal": ">= 1.0",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, doc)


if __name__ == "__main__":
    main()
