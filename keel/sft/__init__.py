"""Supervised fine-tuning of a causal LM on chat / instruction JSONL, full or LoRA (TRL SFTTrainer + peft).

Data, one JSON object per line, either
  {"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant", "content": ...}]}   or
  {"prompt": "...", "response": "..."}   (also "completion" for "response")
Every example becomes prompt + completion: the completion is the last assistant message (or the response),
the prompt is everything before it, rendered with the model's chat template when it has one. The loss is
on completion tokens only. With LoRA, model/ holds the merged weights (plain safetensors, loadable and
servable like any run's model) and adapter/ the adapter itself.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path

from keel.align import ScriptTrainer
from keel.data.chat import read_chat_jsonl, split_examples
from keel.errors import DataError
from keel.io import atomic_dir, atomic_write_json

logger = logging.getLogger(__name__)


def merge_lora(model):
    """The adapter folded into the base weights: a plain transformers model that gives the same outputs."""
    return model.merge_and_unload()


def sft_run(recipe, run_dir: Path) -> dict:
    import datasets
    import torch
    from trl import SFTConfig, SFTTrainer

    from keel.align.trainers import (
        _progress_callback,
        common_args,
        load_base,
        load_policy,
        peft_config,
        run_trainer,
        write_logs,
    )
    from keel.train.engine import save_final_model

    if recipe.data.path is None:
        raise DataError("sft needs data.path: a JSONL file of chats (messages) or prompt + response pairs")
    cfg, tr = recipe.sft, recipe.train
    base, tokenizer = load_base(recipe)
    rows = read_chat_jsonl(recipe.data.path, use_chat=tokenizer.chat_template is not None)
    train, test = split_examples(rows, recipe.data)
    n_val = round(recipe.data.split.validation * len(rows))
    steps_per_epoch = math.ceil(len(train) / (tr.batch_size * tr.grad_accum_steps))
    steps = min(tr.max_steps or 10**9, tr.epochs * steps_per_epoch)
    logger.info(f"sft: {len(train)} training and {len(test)} test examples, {cfg.method}, {steps} steps")

    def ds(items):
        return datasets.Dataset.from_list(items)

    torch.manual_seed(tr.seed)
    model = load_policy(base)
    logs: list[dict] = []
    with tempfile.TemporaryDirectory() as work:
        args = SFTConfig(
            **common_args(steps, tr.lr, tr.batch_size, tr.seed, tr.mixed_precision, work),
            gradient_accumulation_steps=tr.grad_accum_steps,
            max_length=recipe.model.max_length,
            completion_only_loss=True,
            packing=False,
            per_device_eval_batch_size=tr.eval_batch_size,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=ds(train),
            eval_dataset=ds(test) if test else None,
            processing_class=tokenizer,
            peft_config=peft_config(cfg.lora, model) if cfg.method == "lora" else None,
            callbacks=[_progress_callback("SFT", steps, logs)],
        )
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # else the evaluation before training prints TRL's raw metric dict
        before = trainer.evaluate()["eval_loss"] if test else None
        run_trainer(trainer)
        after = trainer.evaluate()["eval_loss"] if test else None
    trained = trainer.model
    if cfg.method == "lora":
        with atomic_dir(run_dir / "adapter") as tmp:
            trained.save_pretrained(tmp)
        if cfg.merge:
            trained = merge_lora(trained)
    write_logs(run_dir, logs)
    summary = {
        "steps": steps,
        "best_step": steps,
        "selection_metric": "loss",
        "best_metric": after,
        "labels": [],
        "data": {"source": recipe.data.path, "counts": {"train": len(train), "validation": n_val, "test": len(test)}},
    }
    if cfg.method == "full" or cfg.merge:
        save_final_model(trained.eval(), tokenizer, run_dir / "model", recipe, summary)
    if test:
        result = {
            "split": "test",
            "loss": after,
            "perplexity": math.exp(after),
            "loss_before": before,
            "perplexity_before": math.exp(before),
            "n": len(test),
            "loss_on": "completion tokens only",
        }
        atomic_write_json(run_dir / "eval" / "test.json", result)
        logger.info(f"sft: test loss on responses {before:.4f} -> {after:.4f}")
    atomic_write_json(run_dir / "train.json", summary)
    return summary


class SftTrainer(ScriptTrainer):
    """SFT (sft_run above) as keel's Trainer; sft_run seals RUN/model (and adapter/ with LoRA) itself."""

    script = staticmethod(sft_run)
