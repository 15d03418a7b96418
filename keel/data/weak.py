"""Weak supervision (recipe ``data.weak``): labelling functions vote on unlabelled texts, a label model combines
the votes, and the model trains on the result.

Labelling functions are user code in a Python file the recipe names (or a built-in demo by name): every
module-level function whose name starts with ``lf_`` takes a text and returns a label name, or None to abstain.
keel imports the file only when a run uses it, and says so; ``keel validate`` only compiles it (a syntax error is
one line, and no user code runs).

The label model is Snorkel's ``LabelModel`` (Ratner et al. 2019; snorkel 0.10.0 installs with keel's pinned
stack), with Snorkel's majority vote beside it for comparison; the per-function coverage, overlaps, conflicts and
empirical accuracy are Snorkel's ``LFAnalysis``. The end model trains on the hard labels (the argmax of the
chosen model's probabilities) of the texts at least one function voted on, as in Snorkel's own tutorials.
Which combiner it trains on is, by default (``label_model: auto``), the one whose labels of the validation split's
texts agree more with that split's real labels (majority vote on a tie): on the built-in tweet functions the
label model (with the defaults, chosen there) leads majority vote by 0.3 points on validation and loses with
Snorkel's usual 500 epochs at lr 0.01 (benchmarks/weak_tweets.py), so it has to earn its place on each run.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import sys
from pathlib import Path

from keel.errors import DataError

logger = logging.getLogger(__name__)

ABSTAIN = -1
BUILTIN_FUNCTIONS = {"tweets-sentiment": Path(__file__).parent / "weak_tweets.py"}  # demo name -> file


def functions_file(ref: str) -> Path:
    """The labelling-function file ``data.weak.functions`` names: a built-in demo or a .py file."""
    if ref in BUILTIN_FUNCTIONS:
        return BUILTIN_FUNCTIONS[ref]
    path = Path(ref).expanduser()
    if path.suffix != ".py":
        raise DataError(
            f"data.weak.functions must be a .py file or a built-in set ({', '.join(BUILTIN_FUNCTIONS)}); got {ref!r}"
        )
    if not path.is_file():
        raise DataError(f"data.weak.functions: file '{ref}' not found; check the path (relative to the recipe)")
    return path


def check_functions(ref: str) -> tuple[Path, int]:
    """Parse the file without running it: (its path, how many lf_ functions it defines at top level); a syntax
    error is one line naming the file, line and problem."""
    path = functions_file(ref)
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"data.weak.functions: {path} is not UTF-8 text; re-save it as UTF-8") from None
    try:
        tree = ast.parse(source, str(path))
    except SyntaxError as e:
        raise DataError(
            f"data.weak.functions: {path.name} line {e.lineno}: syntax error ({e.msg}); fix the labelling-function file"
        ) from None
    return path, sum(isinstance(n, ast.FunctionDef) and n.name.startswith("lf_") for n in tree.body)


def _too_few(path: Path, n: int) -> str:
    return (
        f"data.weak: the label model needs at least 3 labelling functions; {path.name} has {n}: add more, or "
        "combine them by majority vote alone (data.weak.label_model=majority)"
    )


def load_functions(ref: str) -> list:
    """Import the file (user code) and return its ``lf_*`` functions in the order they are defined."""
    path, _ = check_functions(ref)
    logger.info(f"data.weak: importing labelling functions from {path} (user code; it runs with your permissions)")
    name = f"keel_user_lfs_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise DataError(
            f"data.weak.functions: importing {path.name} raised {type(e).__name__}: {e}; fix the file"
        ) from None
    finally:
        sys.modules.pop(name, None)
    fns = [v for k, v in vars(module).items() if k.startswith("lf_") and callable(v)]
    fns.sort(key=lambda f: getattr(getattr(f, "__code__", None), "co_firstlineno", 0))
    if not fns:
        raise DataError(
            f"data.weak.functions: {path.name} defines no labelling function; name each one lf_<something>(text)"
        )
    return fns


def apply_functions(fns: list, texts: list[str], labels: list[str]):
    """The label matrix L (N, M): L[i, j] = index of the label function j gave text i, or -1 (abstain)."""
    import numpy as np

    index = {name: k for k, name in enumerate(labels)}
    L = np.full((len(texts), len(fns)), ABSTAIN, dtype=np.int64)  # (N, M)
    for j, fn in enumerate(fns):
        for i, text in enumerate(texts):
            try:
                out = fn(text)
            except Exception as e:
                raise DataError(
                    f"data.weak: {fn.__name__} raised {type(e).__name__}: {e} on text {i} ({text[:60]!r}); fix it "
                    "or return None to abstain"
                ) from None
            if out is None:
                continue
            if str(out) not in index:
                raise DataError(
                    f"data.weak: {fn.__name__} returned {out!r}, which is not a label ({', '.join(labels)}); "
                    "return one of those or None to abstain"
                )
            L[i, j] = index[str(out)]
    return L


def analyse(L, fns: list, gold=None) -> list[dict]:
    """Per function: coverage, overlaps, conflicts (Snorkel's LFAnalysis) and, with gold labels (-1 = none),
    empirical accuracy on the texts that have one."""
    import warnings

    from snorkel.labeling import LFAnalysis

    a = LFAnalysis(L)
    with warnings.catch_warnings():  # scipy's FutureWarning about its own diags() call inside Snorkel
        warnings.simplefilter("ignore", FutureWarning)
        stats = zip(fns, a.lf_coverages(), a.lf_overlaps(), a.lf_conflicts())
        rows = [
            {"name": fn.__name__, "coverage": float(c), "overlaps": float(o), "conflicts": float(k)}
            for fn, c, o, k in stats
        ]
    if gold is not None:
        has = gold != ABSTAIN
        for j, row in enumerate(rows):
            voted = has & (L[:, j] != ABSTAIN)
            row["gold_votes"] = int(voted.sum())
            row["accuracy"] = float((L[voted, j] == gold[voted]).mean()) if voted.any() else None
    return rows


def combine(
    L,
    n_labels: int,
    epochs: int,
    seed: int,
    label_model: bool = True,
    class_balance=None,
    lr: float = 0.01,
    l2: float = 0.0,
    L_val=None,
) -> dict:
    """Hard labels (-1: none) by majority vote and, with ``label_model``, by Snorkel's LabelModel (fitted on ``L``
    alone, with ``class_balance`` as its class prior when given), whose probabilities (N, K) come with them; with
    ``L_val`` (validation votes), both combiners' labels of those texts too (``val_majority``, ``val_label_model``)."""
    import numpy as np
    from snorkel.labeling.model import LabelModel, MajorityLabelVoter

    voter = MajorityLabelVoter(cardinality=n_labels)
    out = {"probs": None, "label_model": None, "majority": voter.predict(L, tie_break_policy="abstain")}
    if L_val is not None:
        out["val_majority"], out["val_label_model"] = voter.predict(L_val, tie_break_policy="abstain"), None
    if not label_model:
        return out
    model = LabelModel(cardinality=n_labels, verbose=False)
    prior = None if class_balance is None else [float(v) for v in class_balance]
    model.fit(
        L, n_epochs=epochs, lr=lr, l2=l2, class_balance=prior, seed=seed, log_freq=max(1, epochs), progress_bar=False
    )

    def hard(votes):
        covered = (votes != ABSTAIN).any(axis=1)
        return np.where(covered, model.predict_proba(votes).argmax(axis=1), ABSTAIN)

    out["probs"] = model.predict_proba(L)  # (N, K)
    out["label_model"] = hard(L)
    if L_val is not None:
        out["val_label_model"] = hard(L_val)
    return out


def score(pred, gold) -> dict:
    """Accuracy of hard labels on the texts that have a gold label and a prediction, and the share predicted."""
    has = gold != ABSTAIN
    both = has & (pred != ABSTAIN)
    return {
        "coverage": float(both.sum() / max(1, has.sum())),
        "accuracy": float((pred[both] == gold[both]).mean()) if both.any() else None,
        "n": int(both.sum()),
    }


def weak_labels(texts: list[str], labels: list[str], cfg, gold=None, val=None) -> tuple[object, dict]:
    """(hard labels to train on, -1 where dropped; the summary for RUN/data/weak.json). ``val``: (texts, label ids)
    of the validation split, which scores both combiners, gives ``class_balance: validation`` its prior and
    decides ``label_model: auto``."""
    import numpy as np

    fns = load_functions(cfg.functions)
    fit = len(fns) >= 3  # Snorkel's LabelModel cannot be fitted on fewer functions
    if not fit and cfg.label_model == "snorkel":
        raise DataError(_too_few(functions_file(cfg.functions), len(fns)))
    L = apply_functions(fns, texts, labels)
    has_val = val is not None and len(val[0]) > 0
    L_val = apply_functions(fns, list(val[0]), labels) if has_val else None
    prior = None
    if cfg.class_balance == "validation" and has_val:
        counts = np.bincount(np.asarray(val[1], dtype=np.int64), minlength=len(labels)) + 1.0  # +1: no zero prior
        prior = counts / counts.sum()
    out = combine(L, len(labels), cfg.epochs, cfg.seed, fit, prior, cfg.lr, cfg.l2, L_val)
    on_val = {}
    if has_val:
        y_val = np.asarray(val[1], dtype=np.int64)
        on_val["majority vote"] = score(out["val_majority"], y_val)
        if fit:
            on_val["label model"] = score(out["val_label_model"], y_val)
    method, why = cfg.label_model, "set in the recipe"
    if method == "auto":
        lm, mv = on_val.get("label model", {}).get("accuracy"), on_val.get("majority vote", {}).get("accuracy")
        if not fit:
            method, why = "majority", "auto: fewer than 3 functions, so majority vote"
        elif lm is None or mv is None:
            method, why = "snorkel", "auto: no validation labels to compare on, so the label model"
        else:
            method = "snorkel" if lm > mv else "majority"
            why = f"auto: validation accuracy {lm:.3f} (label model) vs {mv:.3f} (majority vote; wins a tie)"
    chosen = out["label_model"] if method == "snorkel" else out["majority"]
    if cfg.min_confidence > 0 and method == "snorkel":
        chosen = np.where(out["probs"].max(axis=1) >= cfg.min_confidence, chosen, ABSTAIN)
    import snorkel

    summary = {
        "functions_file": str(functions_file(cfg.functions)),
        "label_model": f"snorkel LabelModel {snorkel.__version__}" if fit else "none (fewer than 3 functions)",
        "class_balance": "learned" if prior is None else [round(float(v), 4) for v in prior],
        "trained_on": "label model" if method == "snorkel" else "majority vote",
        "chosen_by": why,
        "texts": len(texts),
        "kept": int((chosen != ABSTAIN).sum()),
        "functions": analyse(L, fns, gold),
        "labels": labels,
    }
    if on_val:
        summary["on_validation"] = on_val
    if gold is not None and (gold != ABSTAIN).any():
        summary["versus_gold"] = {"majority vote": score(out["majority"], gold)}
        if out["label_model"] is not None:
            summary["versus_gold"]["label model"] = score(out["label_model"], gold)
    return chosen, summary


def weak_train(train_ds, tokenizer, recipe, prepared, run_dir: Path | None = None):
    """The training split the model trains on with ``data.weak``: without ``unlabeled``, the training texts
    relabelled by the label model (their own labels only score the functions); with it, the file's texts, weakly
    labelled, added to the training split (texts also in validation or test are left out). Texts no function
    voted on are dropped. The summary goes to RUN/data/weak.json for the report."""
    import datasets
    import numpy as np

    cfg, labels = recipe.data.weak, prepared.labels
    if cfg.unlabeled is None:
        texts = list(train_ds["text"])
        gold = np.asarray(train_ds["label"], dtype=np.int64)
    else:
        texts, gold = read_unlabeled(cfg.unlabeled, recipe, labels)
        held = {t for s in ("validation", "test") for t in prepared.splits[s]["text"]}
        keep = [i for i, t in enumerate(texts) if t not in held]
        if len(keep) < len(texts):
            logger.info(f"data.weak: {len(texts) - len(keep)} unlabelled texts are in validation or test; left out")
        texts, gold = [texts[i] for i in keep], None if gold is None else gold[keep]
    val_split = prepared.splits.get("validation")
    val = None
    if val_split is not None and len(val_split):
        val = (list(val_split["text"]), np.asarray(val_split["label"], dtype=np.int64))
    chosen, summary = weak_labels(texts, labels, cfg, gold, val)
    summary["source"] = "training split" if cfg.unlabeled is None else str(cfg.unlabeled)
    _log_summary(summary)
    if run_dir is not None:
        from keel.io import atomic_write_json
        from keel.progress import is_main_process

        if is_main_process():
            (Path(run_dir) / "data").mkdir(parents=True, exist_ok=True)
            atomic_write_json(Path(run_dir) / "data" / "weak.json", summary)
    kept = [i for i in range(len(texts)) if chosen[i] != ABSTAIN]
    if not kept:
        raise DataError(
            "data.weak: the labelling functions abstained on every text; add functions that vote on more texts"
        )
    if cfg.unlabeled is None:
        rows = train_ds.select(kept).to_dict()  # in memory: the tokenized cache on disk is never written to
        rows["label"] = [int(chosen[i]) for i in kept]
        return datasets.Dataset.from_dict(rows).cast(train_ds.features)
    from keel.data.prepare import append_rows

    return append_rows(train_ds, [texts[i] for i in kept], [int(chosen[i]) for i in kept], None, tokenizer, recipe)


def read_unlabeled(path: str, recipe, labels: list[str]):
    """(texts, gold label ids or None) of ``data.weak.unlabeled``; gold where the file has the label column."""
    import numpy as np

    from keel.data.load import _read_file, column_mapping

    cols = column_mapping(recipe.data, recipe.task)
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data.weak.unlabeled: file '{path}' not found; check the path (relative to the recipe)")
    frame = _read_file(p, "auto")
    if cols["text"] not in frame.columns:
        raise DataError(
            f"data.weak.unlabeled: {p.name} has no column {cols['text']!r} (columns: {', '.join(map(str, frame.columns))}); "
            "rename its text column or set data.columns.text"
        )
    frame = frame[frame[cols["text"]].notna()]
    texts = frame[cols["text"]].astype(str).tolist()
    if not texts:
        raise DataError(f"data.weak.unlabeled: {p.name} has no texts; add rows to it")
    gold = None
    if cols.get("label") in frame.columns:
        index = {name: k for k, name in enumerate(labels)}
        gold = np.array([index.get(str(v), ABSTAIN) for v in frame[cols["label"]]], dtype=np.int64)
    return texts, gold


def _log_summary(summary: dict) -> None:
    logger.info(
        f"data.weak: {len(summary['functions'])} labelling functions on {summary['texts']} texts; "
        f"{summary['kept']} labelled by the {summary['trained_on']} ({summary['chosen_by']})"
    )
    for name, s in (summary.get("versus_gold") or {}).items():
        if s["accuracy"] is not None:
            logger.info(
                f"data.weak: {name}: accuracy {s['accuracy']:.3f} on the {s['n']} gold-labelled texts it covers"
            )


def check_enrichment(recipe) -> None:
    """`keel validate`'s checks of data.augment and data.weak: classification only; the labelling-function file
    compiles (it is not run); the unlabelled file is there; a paraphrase model resolves."""
    from keel.errors import RecipeError

    d = recipe.data
    if recipe.task != "classification":
        which = "data.augment" if d.augment is not None else "data.weak"
        raise RecipeError(f"{which} applies to classification recipes; remove it for task {recipe.task}")
    if d.augment is not None and "paraphrase" in d.augment.ops:
        from keel.models.registry import resolve_model

        resolve_model(d.augment.paraphrase_model, field="data.augment.paraphrase_model")
    if d.weak is None:
        return
    path, n = check_functions(d.weak.functions)
    if n < 3 and d.weak.label_model == "snorkel":
        raise DataError(_too_few(path, n))
    if d.weak.unlabeled is not None and not Path(d.weak.unlabeled).expanduser().is_file():
        raise DataError(
            f"data.weak.unlabeled: file '{d.weak.unlabeled}' not found; check the path (relative to the recipe)"
        )
