"""Using a finished run: evaluate it (its test split, or a file) and predict with it; loading is keel/runtime/load.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from keel.errors import KeelError
from keel.io import atomic_write_json, writes_run
from keel.recipe import Recipe
from keel.runtime.load import Trained, batched_logits, load_trained

logger = logging.getLogger(__name__)


@writes_run
def evaluate_run(
    run_dir: str | Path, data_file: str | None = None, columns: dict | None = None, backend: str = "torch"
) -> dict:
    """Metrics on the run's test split, or on a labelled file with the recipe's column names."""
    import numpy as np
    import torch

    from keel.metrics import majority_baseline
    from keel.tasks import get_task

    t = load_trained(run_dir, backend)
    if t.info["task"] == "causal-lm":
        return _evaluate_lm_run(t, data_file, columns or {}, backend)
    task = get_task(t.info["task"])
    labels = t.info.get("labels") or []
    majority_label = None
    if data_file is None:
        from keel.data.prepare import prepare_data

        data = prepare_data(t.recipe, t.tokenizer, t.run_dir)  # the splits frozen at training time
        dataset, name = data.splits["test"], "test"
        majority_label = data.meta.get("majority_label")
        if len(dataset) == 0:
            raise KeelError(
                "the recipe has no test split (data.split.test is 0); pass --data FILE to evaluate on a file"
            )
    else:
        dataset, name = _file_dataset(t, data_file, labels, columns or {}), Path(data_file).stem
    result = task.evaluate(t.model, dataset, t.tokenizer, t.recipe.train.eval_batch_size, torch.device("cpu"))
    result = {"split": name, "source": data_file or "test split", "backend": backend, **result}
    if t.info["task"] == "classification":
        y = np.asarray(dataset["label"])
        if majority_label is None:  # a file: its own most frequent label (the training split's can score far less)
            majority_label = labels[int(np.bincount(y, minlength=len(labels)).argmax())]
        result["baseline"] = {
            **majority_baseline(y, labels.index(majority_label), labels),
            "of": "training split" if data_file is None else "file",
        }
    suffix = "" if backend == "torch" else f".{backend}"
    atomic_write_json(t.run_dir / "eval" / f"{name}{suffix}.json", result)
    return result


def lm_data_kind(recipe: Recipe) -> str:
    """What a causal-LM run's examples look like: chats (sft), preference pairs (align), or plain text."""
    return "chat" if recipe.sft else "preferences" if recipe.align else "text"


def _evaluate_lm_run(t: Trained, data_file: str | None, columns: dict, backend: str) -> dict:
    """A causal-LM run (pretraining, SFT, alignment) on its test split or on a file in its own format: loss and
    perplexity over every predicted token; for chats and preference pairs also over the replies alone."""
    import torch

    from keel.tasks import causal_lm

    if "onnx" in backend:
        raise KeelError(
            f"--backend {backend}: ONNX Runtime serves classifiers here; evaluate a causal-lm run with the "
            "torch backend or a torchao variant (e.g. torchao-weight-only)"
        )
    kind, recipe = lm_data_kind(t.recipe), t.recipe
    if "label" in columns:
        raise KeelError("--label-column is for classification runs; a causal-lm run has no labels")
    if columns and kind != "text":
        raise KeelError(
            f"--text-column/--label-column are for plain-text files; this {kind} run reads "
            + (
                "JSONL with messages, or prompt + response"
                if kind == "chat"
                else "JSONL with prompt, chosen and rejected"
            )
        )
    name = Path(data_file).stem if data_file else "test"
    if kind == "text":
        dataset = _lm_text_blocks(t, data_file, columns) if data_file else _lm_test_blocks(t)
        result = causal_lm.evaluate(t.model, dataset, t.tokenizer, recipe.train.eval_batch_size, torch.device("cpu"))
        result["n_blocks"] = len(dataset)
    else:
        examples = _lm_examples(t, kind, data_file)
        figures = causal_lm.evaluate_replies(
            t.model, t.tokenizer, examples, recipe.model.max_length, recipe.train.eval_batch_size
        )
        # "loss" is the replies' loss, as SFT reports it; the all-token figures sit beside it
        result = {
            "loss": figures["reply_loss"],
            "perplexity": figures["reply_perplexity"],
            "reply_loss": figures["reply_loss"],
            "reply_perplexity": figures["reply_perplexity"],
            "reply_tokens": figures["reply_tokens"],
            "loss_all_tokens": figures["loss"],
            "perplexity_all_tokens": figures["perplexity"],
            "tokens": figures["tokens"],
            "n": figures["n"],
            "loss_on": "reply tokens only" + (" (the chosen reply of each pair)" if kind == "preferences" else ""),
        }
    result = {"split": name, "source": data_file or "test split", "backend": backend, **result}
    path = t.run_dir / "eval" / (f"{name}.json" if backend == "torch" else f"{name}.{backend}.json")
    if (
        data_file is None and kind == "chat" and backend == "torch"
    ):  # keep the before-training figures the SFT run wrote there
        before = {k: v for k, v in ((_read_json(path) or {}).items()) if k.endswith("_before")}
        result = {**result, **before}
    atomic_write_json(path, result)
    return result


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _lm_examples(t: Trained, kind: str, data_file: str | None) -> list[dict]:
    """prompt + completion examples: the run's test split, or a file of chats / preference pairs."""
    if kind == "chat":
        from keel.data.chat import read_chat_jsonl, split_examples

        use_chat = t.tokenizer.chat_template is not None
        if data_file:
            examples = read_chat_jsonl(data_file, use_chat)
        else:
            examples = split_examples(read_chat_jsonl(t.recipe.data.path, use_chat), t.recipe.data)[1]
    else:
        from keel.align.lm_bias import lead_token
        from keel.align.prefs import load_preferences, read_preferences

        pairs = (
            read_preferences(data_file)
            if data_file
            else load_preferences(t.recipe.data, lead_token(t.tokenizer))["test"]
        )
        examples = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]
    if not examples:
        raise KeelError("the recipe has no test split (data.split.test is 0); pass --data FILE to evaluate on a file")
    if data_file:
        logger.info(f"evaluating on {data_file} ({len(examples)} {'chats' if kind == 'chat' else 'preference pairs'})")
    return examples


def _lm_test_blocks(t: Trained):
    from keel.data.prepare import prepare_data

    dataset = prepare_data(t.recipe, t.tokenizer, t.run_dir).splits["test"]  # the split frozen at training time
    if len(dataset) == 0:
        raise KeelError("the run's test split holds no full block of model.max_length tokens; pass --data FILE")
    return dataset


def _lm_text_blocks(t: Trained, data_file: str, columns: dict):
    """A plain-text file (the recipe's text column, or --text-column) cut into blocks as in training."""
    from keel.data.load import _check_columns, _read_file, column_mapping
    from keel.data.prepare import _causal_lm

    p = Path(data_file).expanduser()
    if not p.is_file():
        raise KeelError(f"--data: file '{data_file}' not found; check the path")
    text = columns.get("text") or column_mapping(t.recipe.data, "causal-lm")["text"]
    frame = _read_file(p, "auto")
    _check_columns(
        {"text": text}, list(frame.columns), data_file, where="--data", fix="pass --text-column <one of those>"
    )
    frame = frame[[text]].set_axis(["text"], axis=1).dropna().astype(str)
    blocks = _causal_lm(frame, t.tokenizer, t.recipe, [])
    if len(blocks) == 0:
        raise KeelError(
            f"--data: {data_file} holds fewer than model.max_length={t.recipe.model.max_length} tokens; "
            "pass a longer file"
        )
    logger.info(
        f"evaluating on {data_file} ({len(frame)} documents, {len(blocks)} blocks of {t.recipe.model.max_length} tokens)"
    )
    return blocks


def _file_dataset(t: Trained, data_file: str, labels: list[str], columns: dict):
    from keel.data.load import column_mapping, read_eval_file
    from keel.data.prepare import tokenize_classification

    if t.info["task"] != "classification":
        raise KeelError("--data is supported for classification runs; causal-lm runs evaluate on their test split")
    frame = read_eval_file(data_file, {**column_mapping(t.recipe.data, "classification"), **columns}, labels)
    logger.info(f"evaluating on {data_file} ({len(frame)} rows)")
    return tokenize_classification(frame, t.tokenizer, t.recipe, labels)


def predict(
    run_dir: str | Path, texts: list[str], batch_size: int = 32, backend: str = "torch", trained: Trained | None = None
) -> list[dict]:
    """Label and class probabilities for each text (classification runs). ``trained``: the run's model already
    loaded with ``load_trained(run_dir, backend)``, so repeated calls skip loading and hashing it again."""
    t = trained or load_trained(run_dir, backend)
    if t.info["task"] != "classification":
        raise KeelError(f"keel predict works on classification runs; {run_dir} is a {t.info['task']} run")
    labels = t.info["labels"]
    from keel.trust.mitigation import Mitigator  # the audit's per-group thresholds, where they apply to this model

    mitigator = Mitigator.for_run(run_dir, backend)
    probs = batched_logits(t, texts, batch_size).softmax(-1)  # (N, C)
    picked, mitigation = (
        mitigator.apply(texts, probs.numpy(), labels) if mitigator else (probs.argmax(-1).tolist(), None)
    )
    out = []
    for k, (text, p, i) in enumerate(zip(texts, probs, picked)):
        out.append(
            {
                "text": text,
                "label": labels[i],
                "score": float(p[i]),
                "scores": {name: float(v) for name, v in zip(labels, p)},
                **({"mitigation": mitigation[k]} if mitigation else {}),
            }
        )
    return out
