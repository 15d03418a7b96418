"""Fairness audit of a text classifier: Fairlearn per-group metrics, Borkan et al. (2019) AUCs,
counterfactual identity-term swaps, and Fairlearn's ThresholdOptimizer as post-processing mitigation.

Binary views of a multi-class model use one ``positive`` class: selection rate = share predicted
positive; TPR/FPR and the AUCs treat "true label is positive" as the outcome and P(positive) as the score.
Groups smaller than ``min_group_size`` (and the 'none'/'several' buckets of the lexicon) are shown and
flagged, but left out of the between-group differences, which are noise at that size.
"""

from __future__ import annotations

import math
import warnings
from functools import partial

import numpy as np

from keel.trust import lexicon
from keel.trust.mitigation import score_estimator

BUCKETS = ("none", "several")  # lexicon rows that mention no subgroup, or more than one


def positive_index(labels: list[str], positive_label: str | None) -> int:
    from keel.errors import RecipeError

    if positive_label is None:
        return labels.index("positive") if "positive" in labels else len(labels) - 1
    if positive_label not in labels:
        raise RecipeError(
            f"audit.fairness.positive_label '{positive_label}' is not a label of this model "
            f"({', '.join(labels)}); pick one of them"
        )
    return labels.index(positive_label)


def _num(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else round(x, 6)


def group_table(y_true: np.ndarray, y_pred: np.ndarray, sensitive: np.ndarray, pos: int, min_group_size: int) -> dict:
    """MetricFrame per group plus the between-group differences over the groups large enough to rank."""
    from fairlearn.metrics import (
        MetricFrame,
        count,
        demographic_parity_difference,
        equalized_odds_difference,
        false_positive_rate,
        selection_rate,
        true_positive_rate,
    )

    yb, pb = (y_true == pos).astype(int), (y_pred == pos).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # groups without positives give nan TPRs; shown as empty cells
        frame = MetricFrame(
            metrics={
                "selection_rate": partial(selection_rate, pos_label=1),
                "tpr": partial(true_positive_rate, pos_label=1),
                "fpr": partial(false_positive_rate, pos_label=1),
                "count": count,
            },
            y_true=yb,
            y_pred=pb,
            sensitive_features=sensitive,
        )
        acc = MetricFrame(
            metrics=lambda t, p: float(np.mean(np.asarray(t) == np.asarray(p))),
            y_true=y_true,
            y_pred=y_pred,
            sensitive_features=sensitive,
        )
        groups = []
        for g, row in frame.by_group.iterrows():
            n = int(row["count"])
            groups.append(
                {
                    "group": str(g),
                    "n": n,
                    "accuracy": _num(acc.by_group[g]),
                    "selection_rate": _num(row["selection_rate"]),
                    "tpr": _num(row["tpr"]),
                    "fpr": _num(row["fpr"]),
                    "ranked": n >= min_group_size and str(g) not in BUCKETS,
                    "flag": None if n >= min_group_size else f"fewer than {min_group_size} examples",
                }
            )
        ranked = [g["group"] for g in groups if g["ranked"]]
        keep = np.isin(sensitive, ranked)
        dp = eo = None
        if len(ranked) >= 2:
            dp = _num(demographic_parity_difference(yb[keep], pb[keep], sensitive_features=sensitive[keep]))
            eo = _num(equalized_odds_difference(yb[keep], pb[keep], sensitive_features=sensitive[keep]))
    groups.sort(key=lambda g: (not g["ranked"], -g["n"]))
    return {
        "groups": groups,
        "ranked_groups": ranked,
        "demographic_parity_difference": dp,
        "equalized_odds_difference": eo,
        "binary_accuracy": _num(np.mean(yb == pb)) if len(yb) else None,
        "worst_group_accuracy": min(
            (g["accuracy"] for g in groups if g["ranked"] and g["accuracy"] is not None), default=None
        ),
    }


def _auc(y: np.ndarray, s: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return _num(roc_auc_score(y, s)) if len(np.unique(y)) == 2 else None


def borkan_aucs(y_bin: np.ndarray, score: np.ndarray, member: np.ndarray) -> dict:
    """Subgroup AUC, BPSN and BNSP AUCs (Borkan et al. 2019) for one subgroup (``member`` a boolean mask)."""
    bg = ~member
    bpsn = (bg & (y_bin == 1)) | (member & (y_bin == 0))  # background positive, subgroup negative
    bnsp = (bg & (y_bin == 0)) | (member & (y_bin == 1))  # background negative, subgroup positive
    return {
        "subgroup_auc": _auc(y_bin[member], score[member]),
        "bpsn_auc": _auc(y_bin[bpsn], score[bpsn]),
        "bnsp_auc": _auc(y_bin[bnsp], score[bnsp]),
    }


def counterfactual(texts: list[str], probs: np.ndarray, predict_proba, cats: list[str], pos: int) -> dict:
    """Swap identity terms (he/she, Christian/Muslim, ...) and measure how predictions move, per category."""
    out = {}
    for cat in [*cats, "all"]:
        use = cats if cat == "all" else [cat]
        swaps = [lexicon.swap_terms(t, use) for t in texts]
        swapped = [(i, sw.text) for i, sw in enumerate(swaps) if sw.n]
        ambiguous = sum(1 for sw in swaps if sw.ambiguous)  # left out: no grammatical counterfactual
        if not swapped:
            out[cat] = {
                "n": 0,
                "ambiguous": ambiguous,
                "flip_rate": None,
                "mean_score_change": None,
                "mean_abs_score_change": None,
                "examples": [],
            }
            continue
        idx = np.array([i for i, _ in swapped])
        new = predict_proba([s for _, s in swapped])  # (n, C)
        flips = new.argmax(-1) != probs[idx].argmax(-1)
        delta = new[:, pos] - probs[idx, pos]
        examples = [
            {"text": texts[i], "counterfactual": s, "before": float(probs[i, pos]), "after": float(new[k, pos])}
            for k, (i, s) in enumerate(swapped)
            if flips[k]
        ][:5]
        out[cat] = {
            "n": len(idx),
            "ambiguous": ambiguous,
            "flip_rate": _num(flips.mean()),
            "mean_score_change": _num(delta.mean()),
            "mean_abs_score_change": _num(np.abs(delta).mean()),
            "examples": examples,
        }
    return out


def sensitive_features(texts: list[str], column: list[str] | None, cats: list[str]) -> dict[str, np.ndarray]:
    """One sensitive-feature array per audited attribute: the data column, or one per lexicon category."""
    if column is not None:
        return {"group": np.asarray([str(g) for g in column])}
    return {c: np.asarray([lexicon.group_label(t, c) for t in texts]) for c in cats}


def memberships(texts: list[str], column: list[str] | None, cats: list[str]) -> dict[str, np.ndarray]:
    """Boolean masks per subgroup (a text may belong to several), for the Borkan AUCs."""
    if column is not None:
        col = np.asarray([str(g) for g in column])
        return {f"group={g}": col == g for g in sorted(set(col))}
    masks = {}
    for c in cats:
        found = [set(lexicon.groups_in(t, c)) for t in texts]
        for g in lexicon.load_lexicon()["categories"][c]:
            masks[f"{c}: {g}"] = np.array([g in f for f in found])
    return masks


def threshold_optimizer(fit: dict, test: dict, constraint: str, min_group_size: int, seed: int = 0) -> dict:
    """Fit per-group thresholds on ``fit`` (validation) and compare before/after on ``test``.

    ``fit``/``test``: {"y": binary truth, "score": P(positive), "group": sensitive feature}. Groups too small to
    fit (or absent from ``fit``) keep the model's own decision.
    """
    from fairlearn.postprocessing import ThresholdOptimizer

    sizes = {g: int(np.sum(fit["group"] == g)) for g in np.unique(fit["group"])}
    usable = [
        g
        for g, n in sizes.items()
        if n >= min_group_size and g not in BUCKETS and len(np.unique(fit["y"][fit["group"] == g])) == 2
    ]
    if len(usable) < 2:
        return {
            "applied": False,
            "reason": f"fewer than 2 groups with {min_group_size}+ examples of both outcomes in the fitting split",
        }
    opt = ThresholdOptimizer(
        estimator=score_estimator(),
        constraints=constraint,
        objective="accuracy_score",
        prefit=True,
        predict_method="predict_proba",
    )
    m = np.isin(fit["group"], usable)
    opt.fit(fit["score"][m].reshape(-1, 1), fit["y"][m], sensitive_features=fit["group"][m])
    before = (test["score"] >= 0.5).astype(int) if "pred" not in test else test["pred"]
    after = before.copy()
    t = np.isin(test["group"], usable)
    if t.any() and "texts" in test:  # each text's draw comes from the text: what `keel predict` / `keel serve` give
        from keel.trust.mitigation import decide

        d = decide(opt.interpolated_thresholder_, list(test["group"]), test["texts"], test["score"], usable)
        after[t] = d[t]
    elif t.any():
        after[t] = opt.predict(test["score"][t].reshape(-1, 1), sensitive_features=test["group"][t], random_state=seed)
    y = test["y"]
    sens = test["group"]
    from keel.trust.mitigation import interpolation_json

    return {
        "applied": True,
        "constraint": constraint,
        "groups": usable,
        "before": group_table(y, before, sens, 1, min_group_size),
        "after": group_table(y, after, sens, 1, min_group_size),
        "thresholds": interpolation_json(opt),
    }


def audit(
    texts: list[str],
    y_true: np.ndarray,
    probs: np.ndarray,
    labels: list[str],
    cfg,
    predict_proba,
    column: list[str] | None = None,
    fit_split: dict | None = None,
) -> dict:
    """Everything `audit.fairness` asks for, on one split. ``probs`` (N, C) are the model's probabilities."""
    pos = positive_index(labels, cfg.positive_label)
    cats = lexicon.categories(cfg.categories) if column is None else []
    y_pred = probs.argmax(-1)
    y_bin, score = (y_true == pos).astype(int), probs[:, pos]
    result: dict = {
        "n": len(texts),
        "positive_label": labels[pos],
        "source": "column" if column is not None else "lexicon",
        "min_group_size": cfg.min_group_size,
        "attributes": {},
    }
    for attr, sens in sensitive_features(texts, column, cats).items():
        result["attributes"][attr] = group_table(y_true, y_pred, sens, pos, cfg.min_group_size)
    subgroups = []
    for name, mask in memberships(texts, column, cats).items():
        n = int(mask.sum())
        if n == 0:
            continue
        subgroups.append(
            {
                "subgroup": name,
                "n": n,
                **borkan_aucs(y_bin, score, mask),
                "flag": None if n >= cfg.min_group_size else f"fewer than {cfg.min_group_size} examples",
            }
        )
    result["subgroup_aucs"] = subgroups
    result["overall_auc"] = _auc(y_bin, score)
    if cfg.counterfactual:
        result["counterfactual"] = counterfactual(texts, probs, predict_proba, cats or lexicon.categories(), pos)
    if cfg.mitigation == "threshold-optimizer":
        result["mitigation"] = _mitigate(result, y_bin, probs, pos, texts, column, cats, cfg, fit_split)
    return result


def _mitigate(result, y_bin, probs, pos, texts, column, cats, cfg, fit_split) -> dict:
    # the attribute with the largest equalized-odds gap is the one worth mitigating
    attrs = [
        (a, r["equalized_odds_difference"])
        for a, r in result["attributes"].items()
        if r["equalized_odds_difference"] is not None
    ]
    if not attrs:
        reason = "no attribute has two groups large enough to compare"
        return {
            "applied": False,
            "reason": reason,
            "served": {"applied": False, "reason": f"no thresholds were fitted ({reason})"},
        }
    attr = max(attrs, key=lambda x: x[1])[0]
    test = {
        "y": y_bin,
        "score": probs[:, pos],
        "pred": (probs.argmax(-1) == pos).astype(int),
        "texts": list(texts),
        "group": sensitive_features(texts, column, cats if column is None else [])[attr],
    }
    if fit_split is None or not len(fit_split["texts"]):
        fit, note = test, "fitted on the audited split itself (no validation split): optimistic"
    else:
        fy = (fit_split["y"] == pos).astype(int)
        fcol = fit_split.get("column")
        fit = {
            "y": fy,
            "score": fit_split["probs"][:, pos],
            "group": sensitive_features(fit_split["texts"], fcol, cats if fcol is None else [])[attr],
        }
        note = "fitted on the validation split, measured on the audited split"
    out = threshold_optimizer(fit, test, cfg.constraint, cfg.min_group_size)
    if not out["applied"]:
        served = {"applied": False, "reason": f"no thresholds were fitted ({out['reason']})"}
    elif column is not None:
        served = {
            "applied": False,
            "reason": "the groups come from the data column data.columns.group, which a served request does not carry",
        }
    else:
        served = {"applied": True}
    return {"attribute": attr, "note": note, **out, "served": served}


def _named_groups(fair: dict) -> str:
    """The largest named groups per attribute, for a message on why nothing could be ranked."""
    parts = []
    for attr, r in fair.get("attributes", {}).items():
        named = [g for g in r["groups"] if g["group"] not in BUCKETS]
        named.sort(key=lambda g: -g["n"])
        parts.append(f"{attr}: " + (", ".join(f"{g['group']} {g['n']}" for g in named[:3]) or "no group named"))
    return "; ".join(parts) or "no attribute"


def unmeasurable_gates(fair: dict | None, gates) -> list[str]:
    """Each gate that is set but has nothing to measure, as one sentence naming the gate and why."""
    set_gates = gates.thresholds()
    if not set_gates:
        return []
    if fair is None:
        return [f"audit.gates.{g}: no fairness audit ran" for g in set_gates]
    m = fair.get("min_group_size")
    out = []
    no_pairs = f"no attribute has two groups with {m}+ examples ({_named_groups(fair)})"
    for key in ("demographic_parity_difference", "equalized_odds_difference"):
        if f"max_{key}" in set_gates and all(r.get(key) is None for r in fair["attributes"].values()):
            out.append(f"audit.gates.max_{key}: {no_pairs}")
    if "min_group_accuracy" in set_gates and all(
        r.get("worst_group_accuracy") is None for r in fair["attributes"].values()
    ):
        out.append(f"audit.gates.min_group_accuracy: no group with {m}+ examples ({_named_groups(fair)})")
    if "min_subgroup_auc" in set_gates and not any(
        s["flag"] is None and s["subgroup_auc"] is not None for s in fair.get("subgroup_aucs", [])
    ):
        out.append(f"audit.gates.min_subgroup_auc: no subgroup with {m}+ examples of both outcomes")
    if "max_counterfactual_flip_rate" in set_gates:
        cf = fair.get("counterfactual")
        if cf is None:
            out.append("audit.gates.max_counterfactual_flip_rate: audit.fairness.counterfactual is off")
        elif (cf.get("all") or {}).get("flip_rate") is None:
            out.append("audit.gates.max_counterfactual_flip_rate: no audited text has a swappable identity term")
    return out


def check_gates(fair: dict | None, gates) -> list[str]:
    """Each crossed threshold as one sentence; empty when every gate holds. A gate with nothing to measure is not
    crossed: ``unmeasurable_gates`` names those, and the audit fails on them unless told to warn."""
    if fair is None:
        return []
    failures = []

    def worst(key, higher_is_worse=True):
        vals = [(a, r[key]) for a, r in fair["attributes"].items() if r.get(key) is not None]
        if not vals:
            return None
        return max(vals, key=lambda x: x[1]) if higher_is_worse else min(vals, key=lambda x: x[1])

    for key, gate in (
        ("demographic_parity_difference", gates.max_demographic_parity_difference),
        ("equalized_odds_difference", gates.max_equalized_odds_difference),
    ):
        w = worst(key)
        if gate is not None and w and w[1] > gate:
            failures.append(f"{key.replace('_', ' ')} {w[1]:.3f} for '{w[0]}' exceeds audit.gates.max_{key} = {gate}")
    w = worst("worst_group_accuracy", higher_is_worse=False)
    if gates.min_group_accuracy is not None and w and w[1] < gates.min_group_accuracy:
        failures.append(
            f"group accuracy {w[1]:.3f} ('{w[0]}') is below audit.gates.min_group_accuracy = {gates.min_group_accuracy}"
        )
    if gates.min_subgroup_auc is not None:
        ranked = [s for s in fair["subgroup_aucs"] if s["flag"] is None and s["subgroup_auc"] is not None]
        if ranked:
            s = min(ranked, key=lambda s: s["subgroup_auc"])
            if s["subgroup_auc"] < gates.min_subgroup_auc:
                failures.append(
                    f"subgroup AUC {s['subgroup_auc']:.3f} ('{s['subgroup']}') is below "
                    f"audit.gates.min_subgroup_auc = {gates.min_subgroup_auc}"
                )
    cf = (fair.get("counterfactual") or {}).get("all") or {}
    if (
        gates.max_counterfactual_flip_rate is not None
        and cf.get("flip_rate") is not None
        and cf["flip_rate"] > gates.max_counterfactual_flip_rate
    ):
        failures.append(
            f"counterfactual flip rate {cf['flip_rate']:.3f} exceeds "
            f"audit.gates.max_counterfactual_flip_rate = {gates.max_counterfactual_flip_rate}"
        )
    return failures
