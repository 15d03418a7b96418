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

    from keel.models.resize import is_resized, load_resized

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
        batch = collate(dataset[start : start + batch_size], tokenizer)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            loss = model(**batch).loss.float().item()
        n = batch["input_ids"].numel() - batch["input_ids"].shape[0]  # predicted positions
        total, tokens = total + loss * n, tokens + n
    mean = total / tokens if tokens else float("nan")
    return {"loss": mean, "perplexity": math.exp(mean) if tokens else float("nan"), "tokens": tokens}


def reply_tokens(tokenizer, example: dict, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + reply and a mask (1 on reply tokens), tokenized as TRL's SFTTrainer does: chat
    messages through the chat template, plain strings with EOS after the reply; the reply starts where the
    tokenized prompt and prompt + reply diverge."""
    prompt, reply = example["prompt"], example["completion"]
    if isinstance(prompt, list):  # messages
        head = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
        full = tokenizer.apply_chat_template(prompt + reply, tokenize=True, return_dict=True)
        head, full = head["input_ids"], full["input_ids"]
    else:
        eos = tokenizer.eos_token or ""
        reply = reply if not eos or reply.endswith(eos) else reply + eos
        head, full = tokenizer(text=prompt)["input_ids"], tokenizer(text=prompt + reply)["input_ids"]
    start = next((i for i, (a, b) in enumerate(zip(head, full)) if a != b), min(len(head), len(full)))
    mask = [0] * start + [1] * (len(full) - start)
    return full[:max_length], mask[:max_length]


@torch.no_grad()
def evaluate_replies(model, tokenizer, examples: list[dict], max_length: int, batch_size: int, device="cpu") -> dict:
    """Loss and perplexity of prompt + reply examples over every predicted token, and over the reply tokens
    alone (what SFT trains on); token-weighted means over the whole set."""
    model.eval()
    encoded = [reply_tokens(tokenizer, e, max_length) for e in examples]
    sums = {"all": 0.0, "reply": 0.0}
    counts = {"all": 0, "reply": 0}
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T), right-padded
        attn = torch.zeros_like(ids)
        reply = torch.zeros_like(ids)
        for row, (tokens, mask) in enumerate(chunk):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            attn[row, : len(tokens)] = 1
            reply[row, : len(mask)] = torch.tensor(mask)
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float()  # (B, T, V)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), ids[:, 1:].to(device), reduction="none"
        ).cpu()  # (B, T-1): -log p(token t+1 | ..t)
        predicted = attn[:, 1:].bool()
        for key, mask in (("all", predicted), ("reply", predicted & reply[:, 1:].bool())):
            sums[key] += float(nll[mask].sum())
            counts[key] += int(mask.sum())

    def mean(key):
        return sums[key] / counts[key] if counts[key] else float("nan")

    return {
        "loss": mean("all"),
        "perplexity": math.exp(mean("all")) if counts["all"] else float("nan"),
        "tokens": counts["all"],
        "reply_loss": mean("reply"),
        "reply_perplexity": math.exp(mean("reply")) if counts["reply"] else float("nan"),
        "reply_tokens": counts["reply"],
        "n": len(examples),
    }
