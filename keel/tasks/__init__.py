"""What differs between tasks (model head, batching, evaluation); the training loop is shared.

A task module provides: ``build_model(path, labels)``, ``collate(rows, tokenizer)`` and
``evaluate(model, dataset, tokenizer, batch_size, device, autocast)``.
"""

from importlib import import_module

TASKS = {"classification": "keel.tasks.classification", "causal-lm": "keel.tasks.causal_lm"}


def get_task(name: str):
    return import_module(TASKS[name])
