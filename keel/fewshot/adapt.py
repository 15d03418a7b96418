"""`keel fewshot`: new labels added to a trained classifier from a few examples each, saved as a new run.

The source run is only read. The new run (RUN_DIR-fewshot) holds the same encoder (or one trained further on
episodes or pairs) with a head over every label, old and new, fitted on the support rows plus a sample of the
run's own training split, so the old labels are kept without retraining from scratch:

    runs/<name>-fewshot/
      recipe.yaml  run.json  splits/ (the source run's, so `keel eval` scores the old test split)
      model/       an ordinary *ForSequenceClassification folder + keel.json + manifest.json
      fewshot.json what was done, and the old labels' test accuracy before and after
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from keel.errors import KeelError
from keel.io import atomic_write_json, atomic_write_text, fsync_dir, write_manifest
from keel.recipe.fewshot import FewshotConfig

logger = logging.getLogger(__name__)


def output_folder(run_dir: Path, output_dir: str | None) -> Path:
    if output_dir:
        path = Path(output_dir)
        if path.exists() and any(path.iterdir()):
            raise KeelError(f"fewshot.output_dir: {path} already holds files; pick a new folder")
        return path
    path, n = run_dir.with_name(f"{run_dir.name}-fewshot"), 2
    while path.exists():
        path, n = run_dir.with_name(f"{run_dir.name}-fewshot-{n}"), n + 1
    return path


def old_rows(run_dir: Path, labels: list[str], per_label: int, seed: int) -> tuple[list[str], list[str]]:
    """Up to ``per_label`` training rows of each existing label (the run's frozen training split)."""
    from keel.data.splits import load_frozen

    train = load_frozen(run_dir).train
    rng = random.Random(seed)
    texts, names = [], []
    for name in labels:
        pool = train.loc[train["label"].astype(str) == name, "text"].astype(str).tolist()
        for text in pool if len(pool) <= per_label else rng.sample(pool, per_label):
            texts.append(text)
            names.append(name)
    return texts, names


def fit_head(model, tokenizer, texts: list[str], y: list[int], labels: list[str], method: str, max_length: int, seed=0):
    """The head over every label: class means (prototype) or a logistic regression (setfit); set on ``model``."""
    import torch

    from keel.fewshot.heads import embed, logistic_weights, prototype_weights, prototypes, set_head

    feats = embed(model, tokenizer, texts, max_length)  # (N, H)
    target = torch.tensor(y)
    if method == "setfit":
        weight, bias = logistic_weights(feats, target, len(labels), seed)
    else:
        weight, bias = prototype_weights(prototypes(feats, target, len(labels)))
    return set_head(model, weight, bias, labels)


def accuracy(model, tokenizer, texts: list[str], y: list[int], max_length: int) -> float | None:
    import torch

    if not texts:
        return None
    from keel.fewshot.heads import embed, head_linear

    _, _, layer = head_linear(model)
    with torch.no_grad():
        picked = layer(embed(model, tokenizer, texts, max_length)).argmax(-1)  # (N,)
    return round(float((picked == torch.tensor(y)).float().mean()), 4)


def add_labels(run_dir: str | Path, support: str | Path, recipe, cfg: FewshotConfig) -> dict:
    """Fit the new run from ``run_dir`` and a support file; returns what fewshot.json records."""
    import torch

    from keel.fewshot.support import read_support
    from keel.fewshot.train import contrastive_finetune, episodic_train
    from keel.runtime.load import load_trained

    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    if not run_dir.is_dir():
        raise KeelError(f"run directory '{run_dir}' not found; pass the folder `keel run` printed (see runs/)")
    # bad input is refused before the model is loaded
    final = output_folder(run_dir, cfg.output_dir)
    texts, names = read_support(support, cfg.text_column, cfg.label_column, cfg.k_shot, cfg.seed)
    from keel.secure.seal import is_sealed

    if is_sealed(run_dir / "model"):  # the new run would hold its weights in the clear
        raise KeelError(f"{run_dir}'s model is sealed; run `keel unseal {run_dir}` first, then seal the new run")
    t = load_trained(run_dir, "torch")  # the run's own weights, checked against their manifest
    if t.info["task"] != "classification":
        raise KeelError(f"keel fewshot adds labels to classifiers; {run_dir} is a {t.info['task']} run")
    if t.info.get("resized"):
        raise KeelError(f"{run_dir}'s model is structurally pruned; run keel fewshot on the run it was pruned from")
    old = list(t.info["labels"])
    new = [name for name in dict.fromkeys(names) if name not in old]
    labels = old + new  # old labels keep their indices
    shots = {name: names.count(name) for name in dict.fromkeys(names)}
    logger.info(
        f"support: {len(texts)} rows; new labels {', '.join(new) or 'none'}"
        + (f"; more rows for {', '.join(n for n in shots if n in old)}" if any(n in old for n in shots) else "")
    )
    max_length = t.recipe.model.max_length
    torch.manual_seed(cfg.seed)
    model, tokenizer = t.model, t.tokenizer
    test = _old_test(run_dir, old, cfg.eval_examples, cfg.seed)
    before = accuracy(model, tokenizer, test[0], [old.index(n) for n in test[1]], max_length)
    o_texts, o_names = old_rows(run_dir, old, cfg.old_examples, cfg.seed)
    kept = [(x, n) for x, n in zip(o_texts, o_names) if x not in set(texts)]  # a support row counts once
    o_texts, o_names = [x for x, _ in kept], [n for _, n in kept]
    empty = [name for name in labels if name not in set(names) | set(o_names)]
    if empty:
        raise KeelError(
            f"label {empty[0]!r} has no row in {run_dir}'s training split nor in the support file; add a few rows of "
            "it to the support file"
        )
    all_texts, all_y = texts + o_texts, [labels.index(n) for n in names + o_names]
    trained = {}
    if cfg.meta is not None:
        m = cfg.meta
        n_way = m.n_way or min(len(old), 5)
        y_old = [old.index(n) for n in o_names]
        try:
            losses = episodic_train(
                model,
                tokenizer,
                o_texts,
                y_old,
                max_length,
                m.episodes,
                n_way,
                m.k_shot,
                m.n_query,
                m.lr,
                cfg.seed,
            )
        except KeelError as e:
            raise KeelError(f"fewshot.meta: {e} (or raise fewshot.old_examples)") from None
        trained["meta"] = {"episodes": len(losses), "n_way": n_way, "first_loss": losses[0], "last_loss": losses[-1]}
    if cfg.method == "setfit":
        c = cfg.contrastive
        losses = contrastive_finetune(
            model,
            tokenizer,
            all_texts,
            all_y,
            max_length,
            c.iterations,
            c.epochs,
            c.lr,
            c.batch_size,
            c.max_pairs,
            cfg.seed,
        )
        trained["contrastive"] = {"steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1]}
    fit_head(model, tokenizer, all_texts, all_y, labels, cfg.method, max_length, cfg.seed)
    after = accuracy(model, tokenizer, test[0], [old.index(n) for n in test[1]], max_length)
    result = {
        "from": str(run_dir),
        "support": str(support),
        "method": cfg.method,
        "labels": labels,
        "new_labels": new,
        "shots": shots,
        "old_rows_per_label": cfg.old_examples,
        "trained": trained,
        "support_accuracy": accuracy(model, tokenizer, texts, [labels.index(n) for n in names], max_length),
        "old_test": {"rows": len(test[0]), "accuracy_before": before, "accuracy_after": after},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    _write_run(final, run_dir, t, model, labels, recipe, result)
    result["run_dir"] = str(final)
    return result


def _old_test(run_dir: Path, old: list[str], n: int, seed: int) -> tuple[list[str], list[str]]:
    from keel.data.splits import load_frozen

    test = load_frozen(run_dir).test
    rows = list(zip(test["text"].astype(str), test["label"].astype(str)))
    rows = [r for r in rows if r[1] in old]
    if len(rows) > n:
        rows = random.Random(seed).sample(rows, n)
    return [r[0] for r in rows], [r[1] for r in rows]


def _write_run(final: Path, source: Path, t, model, labels: list[str], recipe, result: dict) -> None:
    """The new run, built in a temporary sibling and renamed into place (nothing half-written under ``final``)."""
    import json

    from keel._version import __version__
    from keel.rundir import SPLITS, splits_dir

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    try:
        folder = tmp / "model"
        folder.mkdir()
        model.save_pretrained(folder)
        t.tokenizer.save_pretrained(folder)
        info = {
            **{k: v for k, v in t.info.items() if k not in ("recipe", "labels")},
            "labels": labels,
            "recipe_sha256": recipe.sha256(),
            "fewshot": {k: result[k] for k in ("from", "method", "new_labels", "shots")},
            "recipe": recipe.model_dump(mode="json"),
        }
        (folder / "keel.json").write_text(json.dumps(info, indent=2))
        write_manifest(folder)
        frozen = splits_dir(source)
        if frozen is not None:
            shutil.copytree(frozen, tmp / SPLITS)
        atomic_write_text(
            tmp / "recipe.yaml", f"# keel {__version__}, recipe sha256 {recipe.sha256()}\n" + recipe.to_yaml()
        )
        atomic_write_json(tmp / "fewshot.json", result)
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(
            tmp / "run.json",
            {
                "recipe_sha256": recipe.sha256(),
                "keel_version": __version__,
                "name": recipe.name,
                "task": "classification",
                "status": "finished",
                "started": now,
                "fewshot_from": str(source),
            },
        )
        if final.exists():  # an empty output_dir the user made
            final.rmdir()
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fewshot_run(run_dir: str | Path, support: str | Path, overrides: list[str] | None = None) -> dict:
    """`keel fewshot RUN_DIR --support FILE [fewshot.key=value ...]`: the run's recipe, its fewshot section (with
    the overrides) and ``add_labels``."""
    from keel.recipe import load_recipe

    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise KeelError(f"'{run_dir}' is not a keel run directory (no recipe.yaml); pass the folder `keel run` printed")
    for item in overrides or []:
        if not item.startswith("fewshot."):
            raise KeelError(
                f"keel fewshot takes fewshot.* overrides only (the run's other sections are sealed with its model); "
                f"got {item!r}"
            )
    recipe = load_recipe(run_dir / "recipe.yaml", overrides)
    return add_labels(run_dir, support, recipe, recipe.fewshot or FewshotConfig())
