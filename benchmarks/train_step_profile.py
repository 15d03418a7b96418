"""Per-step time of keel's training loop and of HF `Trainer`'s on identical batches, alternating, in one process.

The quick check behind benchmarks/train_vs_trainer.py: both loops start from the same weights (the same seed before
the model is built) and take the same batches in the same order (keel's length-grouped order of epoch 0, given to
Trainer as its sampler), with the recipe's settings. Each round runs ``--steps`` optimiser steps of one tool, then of
the other (keel, Trainer, Trainer, keel, ...). A step's time is the interval between two steps' ends, so it holds
everything each loop does per step (batching, collation, forward, backward, clipping, update, schedule, logging);
the first ``--warmup`` steps of a round are left out. The first tool of round 1 meets every batch shape first
(CPU kernels plan per shape): run 3 rounds or more and read the median. keel's ends are its metrics.jsonl writes, Trainer's its
``on_step_end`` callbacks. Wall time and process CPU time are both reported: on a shared machine the CPU time of a
one-thread run (``--threads 1``) is the steadier figure.

    python benchmarks/train_step_profile.py                       # quickstart, 40 steps, 3 rounds
    python benchmarks/train_step_profile.py --threads 1 --steps 20
    python benchmarks/train_step_profile.py --quick               # a smoke run on a tiny random model

Prints a table and writes benchmarks/results/train_step_profile.json (``--out`` elsewhere). Ratio = Trainer's median
step time over keel's in each round, the median over rounds (>= 1.0: keel's step is no slower).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).parent / "results"
QUICK = ["model.name=tiny-bert", "model.max_length=32", "data.max_train_samples=256", "data.max_eval_samples=32"]


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _per_step(ends: list[tuple[float, float]], warmup: int) -> dict:
    wall = [b[0] - a[0] for a, b in zip(ends, ends[1:])][warmup:]
    cpu = [b[1] - a[1] for a, b in zip(ends, ends[1:])][warmup:]
    return {
        "steps_timed": len(wall),
        "wall_ms_median": round(1e3 * statistics.median(wall), 2),
        "wall_ms_mean": round(1e3 * statistics.fmean(wall), 2),
        "cpu_ms_median": round(1e3 * statistics.median(cpu), 2),
        "cpu_ms_mean": round(1e3 * statistics.fmean(cpu), 2),
    }


def _digest(batch) -> str:
    """What a step trained on: its padded token ids, (B, T)."""
    ids = batch["input_ids"]
    return hashlib.sha256(str(tuple(ids.shape)).encode() + ids.cpu().numpy().tobytes()).hexdigest()[:16]


def keel_round(recipe, splits: Path, work: Path, batches: list[str]) -> list[tuple[float, float]]:
    """keel's engine as `keel train` runs it; a step ends when its metrics line is written."""
    from keel import metrics
    from keel.tasks import classification
    from keel.train.engine import train

    ends, write, collate = [], metrics.MetricLog.write, classification.collate

    def seen_collate(*args, **kwargs):
        batch = collate(*args, **kwargs)
        if len(batches) < recipe.train.max_steps:  # the training steps; the evaluation after them collates too
            batches.append(_digest(batch))
        return batch

    def timed_write(self, record: dict) -> None:
        write(self, record)
        if "split" not in record:
            ends.append(_clocks())

    shutil.copytree(splits, work / "keel-run")  # the same frozen splits
    metrics.MetricLog.write, classification.collate = timed_write, seen_collate
    try:
        train(recipe, work / "keel-run")
    finally:
        metrics.MetricLog.write, classification.collate = write, collate
    return ends


def trainer_round(recipe, data, order: list[int], model_path: Path, steps: int, work: Path, batches: list[str]):
    """HF Trainer over keel's batches, from the weights keel starts with; a step ends at ``on_step_end``."""
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments, set_seed
    from transformers.utils import logging as hf_logging

    from keel.tasks import get_task

    hf_logging.set_verbosity_error()
    cfg, ends = recipe.train, []

    class Ends(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(_clocks())

    class KeelOrder(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return order  # a list is a sampler: these indices, in this order

    set_seed(cfg.seed)  # as keel's engine, before the model is built: the same fresh head
    model = get_task(recipe.task).build_model(model_path, data.labels)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_ds = data.splits["train"]
    keep = [c for c in ("input_ids", "token_type_ids", "attention_mask", "label") if c in train_ds.column_names]
    args = TrainingArguments(
        output_dir=str(work / "trainer-run"),
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr,
        max_steps=steps,
        warmup_steps=round(cfg.warmup_ratio * steps),
        lr_scheduler_type="constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm or 0.0,
        seed=cfg.seed,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    pad = DataCollatorWithPadding(tokenizer)

    def seen_collate(features):
        batch = pad(features)
        batches.append(_digest(batch))
        return batch

    trainer = KeelOrder(
        model=model,
        args=args,
        train_dataset=train_ds.select_columns(keep),
        data_collator=seen_collate,
        callbacks=[Ends()],
    )
    trainer.train()
    return ends


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="quickstart")
    p.add_argument("--steps", type=int, default=40, help="optimiser steps per round and tool")
    p.add_argument("--rounds", type=int, default=3, help="rounds per tool, alternating (keel, Trainer, Trainer, ...)")
    p.add_argument("--warmup", type=int, default=3, help="steps left out at the start of each round")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny random model, 10 steps, 1 round")
    p.add_argument("--out", type=Path, default=RESULTS / "train_step_profile.json")
    args, overrides = p.parse_known_args()
    overrides = [x for x in overrides if x != "--"]
    if args.quick:
        overrides, args.steps, args.rounds, args.warmup = QUICK + overrides, 10, 1, 1

    import torch
    import transformers
    from transformers import AutoTokenizer

    from keel.data.prepare import prepare_data
    from keel.models import model_dir
    from keel.recipe import load_recipe
    from keel.train.strategies import epoch_order

    if args.threads:
        torch.set_num_threads(args.threads)
        overrides.append(f"train.num_threads={args.threads}")
    recipe = load_recipe(args.recipe, [*overrides, f"train.max_steps={args.steps}"])
    if recipe.task != "classification" or recipe.train.privacy is not None or recipe.train.grad_accum_steps != 1:
        sys.exit("train_step_profile: a classification recipe without train.privacy or gradient accumulation, please")
    path = model_dir(recipe.model.name)
    rows, seen = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_data(recipe, AutoTokenizer.from_pretrained(path), Path(tmp) / "splits", freeze=True)
        cfg, train_ds = recipe.train, data.splits["train"]
        lengths = [len(ids) for ids in train_ds["input_ids"]] if cfg.group_by_length else None
        order = epoch_order(len(train_ds), cfg.seed, 0, lengths, cfg.batch_size)  # keel's epoch 0, one process
        for r in range(args.rounds):
            for tool in ("keel", "trainer") if r % 2 == 0 else ("trainer", "keel"):
                batches: list[str] = []
                with tempfile.TemporaryDirectory() as work:
                    if tool == "keel":
                        ends = keel_round(recipe, Path(tmp) / "splits", Path(work), batches)
                    else:
                        ends = trainer_round(recipe, data, order, path, args.steps, Path(work), batches)
                seen.setdefault(tool, batches[: args.steps])
                row = {"round": r + 1, "tool": tool, **_per_step(ends, args.warmup)}
                row["load_average_1min"] = round(os.getloadavg()[0], 2)
                print(
                    f"round {r + 1} {tool}: {row['wall_ms_median']} ms/step wall, {row['cpu_ms_median']} ms CPU "
                    f"(load {row['load_average_1min']})",
                    file=sys.stderr,
                    flush=True,
                )
                rows.append(row)

    def ratio(clock: str) -> float:  # Trainer over keel within each round (the two ran minutes apart), then the median
        key = f"{clock}_ms_median"
        per_round = [
            next(x[key] for x in rows if x["round"] == r and x["tool"] == "trainer")
            / next(x[key] for x in rows if x["round"] == r and x["tool"] == "keel")
            for r in range(1, args.rounds + 1)
        ]
        return round(statistics.median(per_round), 3)

    ratios = {clock: ratio(clock) for clock in ("wall", "cpu")}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    print(
        f"\nper-step time, keel engine vs HF Trainer on identical batches, {device}, torch threads "
        f"{torch.get_num_threads()}, {recipe.model.name}, batch {cfg.batch_size}, {args.steps} steps per round"
    )
    print(f"{'round':>5}  {'tool':<8}{'wall ms':>9}{'cpu ms':>9}{'load':>6}")
    for x in rows:
        print(
            f"{x['round']:>5}  {x['tool']:<8}{x['wall_ms_median']:>9.1f}{x['cpu_ms_median']:>9.1f}"
            f"{x['load_average_1min']:>6.1f}"
        )
    same = len(seen["keel"]) == args.steps and seen["keel"] == seen["trainer"]
    print(f"identical batches: {'yes' if same else 'NO'} ({len(seen['keel'])} and {len(seen['trainer'])} compared)")
    print(f"ratio Trainer / keel step time (median over rounds): wall {ratios['wall']:.3f}x, cpu {ratios['cpu']:.3f}x")
    doc = {
        "benchmark": "train_step_profile",
        "command": " ".join(["benchmarks/train_step_profile.py", *sys.argv[1:]]),
        "recipe": args.recipe,
        "overrides": overrides,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": rows,
        "identical_batches": same,
        "ratio_wall": ratios["wall"],
        "ratio_cpu": ratios["cpu"],
        "goal": ">= 1.0",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from keel.io import atomic_write_json

    atomic_write_json(args.out, doc)


if __name__ == "__main__":
    main()
