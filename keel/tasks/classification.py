"""Sequence classification: a pretrained encoder with a fresh classification head."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

MODEL_COLUMNS = ("input_ids", "token_type_ids")


def build_model(path: Path, labels: list[str]):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from keel.models.resize import is_resized, load_resized

    if is_resized(path):  # a structurally pruned model: its matrices are smaller than its config says
        return load_resized(AutoModelForSequenceClassification, path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights newly initialized" is the point of fine-tuning
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            local_files_only=True,
            use_safetensors=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)


def collate(columns: dict, tokenizer, pad_to_multiple_of: int | None = None) -> dict:
    """Pad a batch (a dict of columns, as ``dataset[indices]`` returns) to its longest row. Shapes: (B, T)."""
    batch = tokenizer.pad(
        {k: columns[k] for k in MODEL_COLUMNS if k in columns},
        return_tensors="pt",
        pad_to_multiple_of=pad_to_multiple_of,
    )
    if "label" in columns:
        batch["labels"] = torch.tensor(columns["label"], dtype=torch.long)
    return dict(batch)


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Row indices in batches of similar length (shortest first), so little of each padded batch is padding;
    callers put each batch's results back at these indices."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def predict_logits(model, dataset, tokenizer, batch_size: int, device, autocast=nullcontext) -> np.ndarray:
    """Logits (N, C) in dataset order. Rows are scored in batches of similar length, so little is padding."""
    from keel.progress import progress

    model.eval()
    logits = np.zeros((len(dataset), model.config.num_labels), dtype=np.float32)
    with progress("example", transient=True) as bar:
        task = bar.add_task("evaluating", total=len(dataset), info="")
        done = 0
        for idx in length_batches([len(ids) for ids in dataset["input_ids"]], batch_size):
            batch = {k: v.to(device) for k, v in collate(dataset[idx], tokenizer).items() if k != "labels"}
            with autocast():
                logits[idx] = model(**batch).logits.float().cpu().numpy()  # (B, C)
            done += len(idx)
            bar.update(task, completed=done)
    return logits


def evaluate(model, dataset, tokenizer, batch_size: int, device, autocast=nullcontext) -> dict:
    from keel.metrics import classification_metrics

    logits = predict_logits(model, dataset, tokenizer, batch_size, device, autocast)
    y_true = np.asarray(dataset["label"])
    loss = (
        float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y_true)).item())
        if len(y_true)
        else float("nan")
    )
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    metrics = classification_metrics(y_true, logits.argmax(-1), labels)
    return {"loss": loss, **metrics}
