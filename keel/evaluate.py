"""Using a finished run: load its model (checksums first), evaluate it, predict with it."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from keel.errors import CheckpointError, KeelError
from keel.io import atomic_write_json, verify_manifest, writes_run
from keel.recipe import Recipe, load_recipe, validate_recipe
from keel.rundir import export_dir, variant_location

logger = logging.getLogger(__name__)


@dataclass
class Trained:
    model: object
    tokenizer: object
    info: dict  # keel.json
    recipe: Recipe
    run_dir: Path


BACKENDS = ("torch", "onnx", "onnx-int8", "onnx-static-int8", "torchao-weight-only", "torchao-dynamic")


def load_trained(run_dir: str | Path, backend: str = "torch") -> Trained:
    """The final model of a run, one of its exports, or a compressed variant (``student-onnx-int8``, ...).
    Every file is checked against its manifest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise KeelError(f"run directory '{run_dir}' not found; pass the folder `keel run` printed (see runs/)")
    if backend not in BACKENDS:
        run_dir, backend = variant_location(run_dir, backend)
        if backend not in BACKENDS:
            raise KeelError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        if not run_dir.is_dir():
            raise CheckpointError(f"{run_dir} does not exist; run `keel compress` (or distill/prune) first")
    folder = run_dir / "model"
    if not folder.is_dir():
        raise CheckpointError(
            f"{run_dir} has no final model yet (model/ is missing); finish training with `keel train RECIPE --resume`"
        )
    info = verified_model(run_dir)
    recipe = sealed_recipe(run_dir, info)
    from transformers import AutoTokenizer

    from keel.secure import memory
    from keel.secure.seal import is_sealed, open_folder
    from keel.tasks import get_task

    sealed = is_sealed(folder)  # decrypted in memory with $KEEL_SEAL_KEY (or its key file); nothing plain on disk
    if backend.startswith("onnx"):
        from keel.export.ort import OnnxClassifier

        onnx_folder = export_dir(run_dir, backend)
        if not onnx_folder.is_dir():
            raise CheckpointError(f"{run_dir} has no {backend} export yet; run `keel export {run_dir}` first")
        model = OnnxClassifier(onnx_folder)
        tokenizer = memory.tokenizer(model.files) if model.files else AutoTokenizer.from_pretrained(folder)
    elif sealed:
        if info.get("resized"):
            raise KeelError(
                f"{folder} is sealed and structurally pruned, which in-memory opening does not cover; run "
                f"`keel unseal {run_dir}` to use it"
            )
        files = open_folder(folder)
        tokenizer = memory.tokenizer(files)
        model = memory.hf_model(files)
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = get_task(info["task"]).build_model(folder, info.get("labels") or [])
        if backend.startswith("torchao-"):
            from keel.compress.quantize import torchao_int8

            model = torchao_int8(model, backend.removeprefix("torchao-"))
    model.eval()
    return Trained(model, tokenizer, info, recipe, run_dir)


def verified_model(run_dir: Path) -> dict:
    """Check RUN/model against its manifest (every file, and no file it does not list); returns its keel.json."""
    folder = Path(run_dir) / "model"
    verify_manifest(folder)
    return json.loads((folder / "keel.json").read_text())


SEALED_SECTIONS = {"task", "model"}  # what decides how a trained model is run


def sealed_recipe(run_dir: Path, info: dict) -> Recipe:
    """The run's recipe, checked against the one the model was sealed with (in model/keel.json).

    The sections that decide how the model is run (``task``, ``model``: max_length, ...) must say what was sealed: an
    edited or missing recipe.yaml is refused, never silently used or ignored. The sections of later stages (audit,
    compress, serve) may be edited in the run's recipe.yaml between stages, as before."""
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing; restore it (the model in {Path(run_dir) / 'model'} was sealed with "
            "its recipe) or train a new run"
        )
    current = load_recipe(path)
    if "recipe" not in info:  # sealed by an older keel: the recipe's hash in keel.json covers it
        if info.get("recipe_sha256") != current.sha256():
            raise CheckpointError(
                f"{path} is not the recipe {Path(run_dir) / 'model'} was sealed with (sha256 "
                f"{current.sha256()[:12]} vs {str(info.get('recipe_sha256'))[:12]}); restore it or "
                "train a new run"
            )
        return current
    sealed = validate_recipe(info["recipe"], source=f"{Path(run_dir) / 'model' / 'keel.json'} recipe")
    changed = _first_change(
        sealed.model_dump(mode="json", include=SEALED_SECTIONS),
        current.model_dump(mode="json", include=SEALED_SECTIONS),
    )
    if changed:
        key, old, new = changed
        raise CheckpointError(
            f"{path} was changed after the model was sealed: {key} is {new!r} there and {old!r} in "
            f"the recipe sealed in {Path(run_dir) / 'model' / 'keel.json'}; restore it, or train a "
            "new run with the new settings"
        )
    return current


def _first_change(old: dict, new: dict, prefix: str = "") -> tuple[str, object, object] | None:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_change(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}", a, b
    return None


@writes_run
def evaluate_run(
    run_dir: str | Path, data_file: str | None = None, columns: dict | None = None, backend: str = "torch"
) -> dict:
    """Metrics on the run's test split, or on a labelled file with the recipe's column names."""
    import numpy as np
    import torch

    from keel.tasks import get_task
    from keel.train.metrics import majority_baseline

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


def text_logits(t: Trained, texts: list[str]):
    """Logits (B, C) for raw texts, through whichever backend ``t`` was loaded with."""
    import torch

    enc = t.tokenizer(texts, truncation=True, max_length=t.recipe.model.max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        return t.model(**enc).logits.float()


def batched_logits(t: Trained, texts: list[str], batch_size: int = 32):
    """Logits (N, C) in the order given, computed on batches of texts of similar length (less padding)."""
    import torch

    from keel.tasks.classification import length_batches

    texts = list(texts)
    lengths = (
        [len(ids) for ids in t.tokenizer(texts, truncation=True, max_length=t.recipe.model.max_length)["input_ids"]]
        if texts
        else []
    )
    out = [None] * len(texts)
    for idx in length_batches(lengths, batch_size):
        for i, row in zip(idx, text_logits(t, [texts[i] for i in idx])):
            out[i] = row
    return torch.stack(out) if out else torch.zeros((0, len(t.info.get("labels") or [])))


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
