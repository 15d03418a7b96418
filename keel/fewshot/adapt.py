"""`keel fewshot`: new labels added to a trained classifier from a few examples each, saved as a new run.

The source run is only read. The new run (RUN_DIR-fewshot) holds the same encoder with the trained head's rows for
the old labels kept bit for bit and one row appended per new label (keel/fewshot/append.py: a prototype of its
support rows, its bias chosen on the run's validation split and leave-one-out of the support rows so that the old
labels' validation accuracy drops at most ``fewshot.max_old_drop``). With ``fewshot.method=setfit`` or
``fewshot.meta`` the encoder is trained further, the trained rows no longer fit its features, and the whole head is
refitted on the support rows plus a sample of the run's training split; the same validation gate applies.

    runs/<name>-fewshot/
      recipe.yaml  run.json  splits/ (the source run's, so `keel eval` scores the old test split)
      model/       an ordinary *ForSequenceClassification folder + keel.json + manifest.json
      fewshot.json what was done; the old labels' validation and test accuracy before and after; the new labels'
                   leave-one-out accuracy
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
    """The head over every label, refitted: class means (prototype) or a logistic regression (setfit); set on
    ``model``. Returns the features (N, H) it was fitted on."""
    import torch

    from keel.fewshot.heads import embed, logistic_weights, prototype_weights, prototypes, set_head

    feats = embed(model, tokenizer, texts, max_length)  # (N, H)
    target = torch.tensor(y)
    if method == "setfit":
        weight, bias = logistic_weights(feats, target, len(labels), seed)
    else:
        weight, bias = prototype_weights(prototypes(feats, target, len(labels)))
    set_head(model, weight, bias, labels)
    return feats


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

    from keel.fewshot.heads import embed
    from keel.fewshot.support import read_support
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
    retrain = cfg.meta is not None or cfg.method == "setfit"  # the encoder changes: the trained rows no longer fit
    if not new and not retrain:
        raise KeelError(
            f"the support file has no new label (its labels {', '.join(shots)} are all {run_dir}'s own); keel fewshot "
            "appends labels and keeps the trained ones as they are: add rows of a new label"
        )
    logger.info(
        f"support: {len(texts)} rows; new labels {', '.join(new) or 'none'}"
        + (f"; more rows for {', '.join(n for n in shots if n in old)}" if any(n in old for n in shots) else "")
    )
    max_length = t.recipe.model.max_length
    torch.manual_seed(cfg.seed)
    model, tokenizer = t.model, t.tokenizer
    test = _old_split(run_dir, "test", old, cfg.eval_examples, cfg.seed)
    val = _old_split(run_dir, "validation", old, cfg.eval_examples, cfg.seed)
    val_y = torch.tensor([old.index(n) for n in val[1]], dtype=torch.long)
    test_y = torch.tensor([old.index(n) for n in test[1]], dtype=torch.long)
    val_feats = embed(model, tokenizer, val[0], max_length) if val[0] else None  # (V, H), the encoder as trained
    test_feats = embed(model, tokenizer, test[0], max_length) if test[0] else None  # (T, H)
    before_val, before = _head_accuracy(model, val_feats, val_y), _head_accuracy(model, test_feats, test_y)
    floor = None if before_val is None else before_val - cfg.max_old_drop
    if retrain:
        trained, held = _retrain(model, tokenizer, run_dir, texts, names, old, labels, max_length, cfg)
        val_feats = embed(model, tokenizer, val[0], max_length) if val[0] else None  # the trained encoder's
        test_feats = embed(model, tokenizer, test[0], max_length) if test[0] else None
        head, kept = {}, f"refitted ({'setfit' if cfg.method == 'setfit' else 'meta'} trained the encoder)"
    else:
        if floor is None:
            raise KeelError(
                f"no validation rows of {run_dir}'s labels to choose the new rows on; keep fewshot.eval_examples "
                "above 0, and run keel fewshot on a run trained with a validation split (data.split.validation > 0)"
            )
        trained, kept = {}, "kept"
        head, held = _append(model, tokenizer, texts, names, old, new, labels, val_feats, val_y, floor, max_length)
        for name in new:
            if head[name]["recall"] == 0 or held[name] == 0:  # held out: the whole choice redone without the row
                raise KeelError(_unrecognised(name, shots[name], head[name], before_val, cfg.max_old_drop))
    after_val = _head_accuracy(model, val_feats, val_y)
    if before_val is not None and before_val - after_val > cfg.max_old_drop + 1e-9:
        raise KeelError(_dropped(before_val, after_val, cfg, retrain))
    after = _head_accuracy(model, test_feats, test_y)
    result = {
        "from": str(run_dir),
        "support": str(support),
        "method": cfg.method,
        "labels": labels,
        "new_labels": new,
        "shots": shots,
        "old_rows": kept,
        "old_rows_per_label": cfg.old_examples if retrain else None,
        "trained": trained,
        "head": head,
        "support_accuracy": accuracy(model, tokenizer, texts, [labels.index(n) for n in names], max_length),
        "new_held_out": held,
        "old_validation": {
            "rows": len(val[0]),
            "accuracy_before": _round(before_val),
            "accuracy_after": _round(after_val),
            "max_old_drop": cfg.max_old_drop,
        },
        "old_test": {"rows": len(test[0]), "accuracy_before": _round(before), "accuracy_after": _round(after)},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    _write_run(final, run_dir, t, model, labels, recipe, result)
    result["run_dir"] = str(final)
    return result


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _head_accuracy(model, feats, y) -> float | None:
    """Accuracy of the model's head on features (N, H) already computed."""
    import torch

    from keel.fewshot.heads import head_linear

    if feats is None:
        return None
    _, _, layer = head_linear(model)
    with torch.no_grad():
        return float((layer(feats).argmax(-1) == y).float().mean())


def _append(model, tokenizer, texts, names, old, new, labels, val_feats, val_y, floor: float, max_length: int):
    """The trained head with one calibrated row per new label appended (keel/fewshot/append.py); set on ``model``.
    Returns (per new label: scale, bias, the figures it was chosen on; per new label: leave-one-out accuracy)."""
    from keel.fewshot.append import append_rows, held_out_accuracy
    from keel.fewshot.heads import embed, head_linear, set_head

    if any(n in old for n in names):
        logger.info("support rows of existing labels leave their trained head rows as they are")
    _, _, layer = head_linear(model)
    weight, bias = layer.weight.detach().float(), layer.bias.detach().float()
    feats = [embed(model, tokenizer, [x for x, n in zip(texts, names) if n == name], max_length) for name in new]
    weight, bias, rows = append_rows(weight, bias, feats, val_feats, val_y, floor)
    held = held_out_accuracy(weight, bias, len(old), feats, val_feats, val_y, floor)
    set_head(model, weight, bias, labels)
    head = {
        name: {
            "scale": row.scale,
            "origin": row.origin,
            "bias": round(row.bias, 4),
            "val_accuracy": round(row.val_accuracy, 4),
            "recall": round(row.recall, 4),
            "unlimited": {"val_accuracy": round(row.free_val_accuracy, 4), "recall": round(row.free_recall, 4)},
        }
        for name, row in zip(new, rows)
    }
    return head, dict(zip(new, held))


def _unrecognised(name: str, k: int, row: dict, before: float, max_drop: float) -> str:
    free = row["unlimited"]
    reach = (
        f"recognising {free['recall']:.0%} of them would take it to {free['val_accuracy']:.3f}"
        if free["recall"] > 0
        else "even with no limit, recognising them would cost the old labels more than it gains"
    )
    return (
        f"new label {name!r}: none of its {k} support rows (each held out) is recognised without the old labels' "
        f"validation accuracy dropping more than fewshot.max_old_drop={max_drop} from {before:.3f}; {reach}. "
        f"Nothing written: add support rows of {name!r} unlike the old labels' texts, or raise fewshot.max_old_drop"
    )


def _dropped(before: float, after: float, cfg: FewshotConfig, retrain: bool) -> str:
    fix = (
        f"fewshot.method=setfit and fewshot.meta retrain the encoder, so every head row is refitted on the support "
        f"and fewshot.old_examples={cfg.old_examples} training rows per old label: raise fewshot.old_examples, use "
        "the default fewshot.method=prototype without meta (it keeps the trained rows), or raise fewshot.max_old_drop"
        if retrain
        else "add more support rows of the new labels, or raise fewshot.max_old_drop"
    )
    return (
        f"the old labels' validation accuracy would drop {before:.3f} -> {after:.3f} (more than "
        f"fewshot.max_old_drop={cfg.max_old_drop}); nothing written. {fix}"
    )


def _retrain(model, tokenizer, run_dir, texts, names, old, labels, max_length: int, cfg: FewshotConfig):
    """fewshot.meta and/or fewshot.method=setfit: the encoder trained further, then the whole head refitted on the
    support rows and a sample of the run's training rows. Returns (what was trained, per new label: leave-one-out
    accuracy of the head refit, the encoder as trained on every row)."""
    from keel.fewshot.train import contrastive_finetune, episodic_train

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
    feats = fit_head(model, tokenizer, all_texts, all_y, labels, cfg.method, max_length, cfg.seed)
    return trained, _refit_held_out(feats, all_y, labels, len(old), len(texts), cfg.method, cfg.seed)


def _refit_held_out(feats, y: list[int], labels: list[str], n_old: int, n_support: int, method: str, seed: int):
    """Per new label: each of its support rows (the first ``n_support`` of ``feats``) left out of the head refit
    and then classified; None for a label with one row."""
    import torch

    from keel.fewshot.heads import logistic_weights, prototype_weights, prototypes

    target = torch.tensor(y)
    out = {}
    for k in range(n_old, len(labels)):
        rows = [i for i in range(n_support) if y[i] == k]
        if len(rows) < 2:
            out[labels[k]] = None
            continue
        hits = 0
        for i in rows:
            keep = torch.tensor([j for j in range(len(y)) if j != i])
            if method == "setfit":
                w, b = logistic_weights(feats[keep], target[keep], len(labels), seed)
            else:
                w, b = prototype_weights(prototypes(feats[keep], target[keep], len(labels)))
            hits += int(int((feats[i] @ w.T + b).argmax()) == k)
        out[labels[k]] = round(hits / len(rows), 4)
    return out


def _old_split(run_dir: Path, split: str, old: list[str], n: int, seed: int) -> tuple[list[str], list[str]]:
    """Up to ``n`` rows of the old labels from one of the run's frozen splits (a seeded sample)."""
    from keel.data.splits import load_frozen

    frame = getattr(load_frozen(run_dir), split)
    rows = list(zip(frame["text"].astype(str), frame["label"].astype(str)))
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
