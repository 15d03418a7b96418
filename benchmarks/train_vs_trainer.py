"""keel's training loop against HF `Trainer` on the same tokenized splits and settings, in alternating rounds.

Both sides get the recipe's tokenized train and validation splits (keel's own cache, one tokenization), the same
model, batch size, learning rate, schedule and warm-up, weight decay, gradient clipping, epochs, seed and
length-grouped batches, and do the same work per epoch: train, evaluate on the validation split, checkpoint
(model + optimiser + RNG), and at the end load the best model. keel's engine runs through `keel.train.engine.train`
(deterministic kernels, exact resume, sealed safetensors checkpoints, a metrics line per step); Trainer with its
defaults otherwise (fused AdamW, no deterministic mode, a log line every 500 steps).
The length-grouped orders come from different seeded generators, so the batches are alike, not identical.

    python benchmarks/train_vs_trainer.py                    # the quickstart recipe, 2 rounds each
    python benchmarks/train_vs_trainer.py --rounds 3 train.epochs=1
    python benchmarks/train_vs_trainer.py --quick            # a smoke run on a tiny random model

Prints a table and writes benchmarks/results/train_vs_trainer.json (``--out`` elsewhere). Ratio = keel's training
samples/s over Trainer's, best round of each (>= 1.0: keel is no slower).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
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


def keel_round(recipe, work: Path) -> dict:
    from keel.train.engine import train

    t0 = time.perf_counter()
    summary = train(recipe, work / "keel-run")
    wall = time.perf_counter() - t0
    steps = [json.loads(x) for x in (work / "keel-run" / "metrics.jsonl").read_text().splitlines()]
    samples = max(r["samples"] for r in steps if "split" not in r)
    return {
        "tool": "keel",
        "wall_seconds": round(wall, 2),
        "loop_seconds": summary["train_seconds_this_session"],
        "steps": summary["steps"],
        "samples": samples,
        "best_metric": summary["best_metric"],
    }


def trainer_round(recipe, splits, model_path: Path, labels: list[str], work: Path) -> dict:
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

    hf_logging.set_verbosity_error()  # "some weights newly initialized" is the point of fine-tuning
    cfg = recipe.train
    metric = recipe.selection_metric
    set_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        local_files_only=True,
        use_safetensors=True,
    )
    keep = [c for c in ("input_ids", "token_type_ids", "attention_mask", "label") if c in splits["train"].column_names]
    train_ds, val_ds = (splits[s].select_columns(keep) for s in ("train", "validation"))
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
    t0 = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - t0
    best = trainer.state.best_metric
    del trainer, model
    gc.collect()
    return {
        "tool": "trainer",
        "wall_seconds": round(wall, 2),
        "loop_seconds": round(out.metrics["train_runtime"], 2),
        "steps": out.global_step,
        "samples": min(len(train_ds) * cfg.epochs, out.global_step * cfg.batch_size),
        "best_metric": best,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="quickstart")
    p.add_argument(
        "--rounds", type=int, default=2, help="rounds per tool, alternating (keel, Trainer, Trainer, keel, ...)"
    )
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny random model, 64 examples, 1 round")
    p.add_argument("--out", type=Path, default=RESULTS / "train_vs_trainer.json")
    args, overrides = p.parse_known_args()
    overrides = [x for x in overrides if x != "--"]
    if args.quick:
        overrides, args.rounds = QUICK + overrides, 1

    import torch
    import transformers
    from transformers import AutoTokenizer

    from keel.data.prepare import prepare_data
    from keel.models import model_dir
    from keel.recipe import load_recipe

    recipe = load_recipe(args.recipe, overrides)
    if recipe.task != "classification" or recipe.train.privacy is not None:
        sys.exit("train_vs_trainer: a classification recipe without train.privacy, please")
    path = model_dir(recipe.model.name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_data(recipe, tokenizer, Path(tmp) / "splits", freeze=True)  # keel's splits, tokenized once
        rounds = []
        for r in range(args.rounds):
            order = ("keel", "trainer") if r % 2 == 0 else ("trainer", "keel")
            for tool in order:
                with tempfile.TemporaryDirectory() as work:
                    work = Path(work)
                    if tool == "keel":
                        import shutil

                        shutil.copytree(Path(tmp) / "splits", work / "keel-run")  # the same frozen splits
                        row = keel_round(recipe, work)
                    else:
                        row = trainer_round(recipe, data.splits, path, data.labels, work)
                row["round"] = r + 1
                row["samples_per_second"] = round(row["samples"] / row["wall_seconds"], 2)
                print(
                    f"round {r + 1} {tool}: {row['wall_seconds']} s, {row['samples_per_second']} samples/s",
                    file=sys.stderr,
                    flush=True,
                )
                rounds.append(row)

    best = {
        tool: max((x for x in rounds if x["tool"] == tool), key=lambda x: x["samples_per_second"])
        for tool in ("keel", "trainer")
    }
    ratio = round(best["keel"]["samples_per_second"] / best["trainer"]["samples_per_second"], 3)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    print(
        f"\nkeel engine vs HF Trainer on {device} (torch {torch.__version__}, transformers {transformers.__version__}), "
        f"{recipe.model.name}, batch {recipe.train.batch_size}, {recipe.train.epochs} epoch(s), "
        f"group_by_length={recipe.train.group_by_length}; load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'round':>5}  {'tool':<8}{'wall s':>9}{'samples/s':>11}{'steps':>7}{'best ' + recipe.selection_metric:>16}")
    for x in rounds:
        print(
            f"{x['round']:>5}  {x['tool']:<8}{x['wall_seconds']:>9.1f}{x['samples_per_second']:>11.2f}{x['steps']:>7}"
            f"{x['best_metric'] if x['best_metric'] is not None else float('nan'):>16.4f}"
        )
    print(f"ratio keel / Trainer (best round each): {ratio:.3f}x  (goal >= 1.0)")
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
        "keel_samples_per_second": best["keel"]["samples_per_second"],
        "trainer_samples_per_second": best["trainer"]["samples_per_second"],
        "ratio": ratio,
        "goal": ">= 1.0",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from keel.io import atomic_write_json

    atomic_write_json(args.out, doc)


if __name__ == "__main__":
    main()
