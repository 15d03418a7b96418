"""Causal language modelling: next-token loss on fixed-length blocks, perplexity for evaluation."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch


def build_model(path: Path, labels: list[str]):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from transformers import AutoModelForCausalLM

    from keel.compress.prune import is_resized, load_resized

    if is_resized(path):  # a structurally pruned model: its matrices are smaller than its config says
        return load_resized(AutoModelForCausalLM, path)
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True)


def collate(columns: dict, tokenizer, pad_to_multiple_of: int | None = None) -> dict:
    ids = torch.tensor(columns["input_ids"], dtype=torch.long)  # (B, T): blocks share one length
    return {"input_ids": ids, "labels": ids.clone()}


@torch.no_grad()
def evaluate(model, dataset, tokenizer, batch_size: int, device, autocast=nullcontext) -> dict:
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collate(dataset[start: start + batch_size], tokenizer)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            loss = model(**batch).loss.float().item()
        n = batch["input_ids"].numel() - batch["input_ids"].shape[0]  # predicted positions
        total, tokens = total + loss * n, tokens + n
    mean = total / tokens if tokens else float("nan")
    return {"loss": mean, "perplexity": math.exp(mean) if tokens else float("nan"), "tokens": tokens}
