"""`keel audit RUN_DIR` (and the audit stage of `keel run`): explanations and a fairness audit of a finished
classification run, written to RUN_DIR/audit/{explain,fairness}.json; MODEL_CARD.md; then the gates."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from keel.errors import GateError, KeelError, RecipeError
from keel.io import atomic_write_json, writes_run
from keel.progress import progress
from keel.recipe import AuditConfig, ExplainConfig, FairnessConfig

logger = logging.getLogger(__name__)


def audit_config(recipe) -> AuditConfig:
    """The recipe's audit section; a run without one gets both parts with their defaults."""
    return recipe.audit or AuditConfig(explain=ExplainConfig(), fairness=FairnessConfig())


def _split(recipe, tokenizer, name: str, cap: int | None, need_group: bool, run_dir=None):
    from keel.data.prepare import prepare_data

    ds = prepare_data(recipe, tokenizer, run_dir).splits[name]  # the run's frozen splits
    if cap is not None and len(ds) > cap:
        ds = ds.select(range(cap))
    texts, y = list(ds["text"]), np.asarray(ds["label"])
    column = None
    if need_group:
        if "group" not in ds.column_names:
            raise RecipeError(
                "audit.fairness.groups is 'column' but the data has no group column; set "
                "data.columns.group to a column of the data, or use audit.fairness.groups=lexicon"
            )
        column = list(ds["group"])
    return texts, y, column


@writes_run
def run_audit(run_dir: str | Path, check_gates: bool = True) -> dict:
    """Run the recipe's audit on ``run_dir``; raises GateError (exit 3) after writing everything if a gate fails."""
    from keel.runtime.load import load_trained
    from keel.trust import explain as ex
    from keel.trust import fairness as fair

    t = load_trained(run_dir)
    if t.info["task"] != "classification":
        raise KeelError(
            f"keel audit works on classification runs; {run_dir} is a {t.info['task']} run "
            f"(causal LMs are audited with CrowS-Pairs/BBQ)"
        )
    cfg = audit_config(t.recipe)
    run_dir, model, tok, max_len = Path(run_dir), t.model, t.tokenizer, t.recipe.model.max_length
    labels = t.info["labels"]
    result: dict = {}
    if cfg.explain:
        t0 = time.perf_counter()
        e = cfg.explain
        texts, _, _ = _split(t.recipe, tok, "test", e.max_examples, False, run_dir)
        if not texts:
            raise KeelError("audit.explain needs test examples; set data.split.test above 0")
        with progress("text") as bar:
            task = bar.add_task("explaining", total=len(texts), info="")
            exps = ex.explain(
                model,
                tok,
                texts,
                e,
                max_len,
                rollout=e.attention_rollout,
                on_batch=lambda n: bar.update(task, completed=n),
            )
        gap = np.array([x.delta for x in exps])
        change = np.array([abs(sum(x.attributions) - x.delta) for x in exps])  # |p(x) - p(baseline)|
        faith = ex.faithfulness(model, tok, exps, e.top_k, e.seed, max_len)
        doc = {
            "n": len(exps),
            "n_steps": e.n_steps,
            "method": "integrated gradients (Captum) on word embeddings",
            "completeness": {
                "mean_abs_delta": float(np.abs(gap).mean()),
                "max_abs_delta": float(np.abs(gap).max()),
                "median_relative_delta": float(np.median(np.abs(gap) / np.maximum(change, 1e-12))),
            },
            "faithfulness": faith,
            "global_importance": ex.global_importance(exps, e.top_tokens),
            "examples": [x.to_json() for x in exps[: e.heatmaps]],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        atomic_write_json(run_dir / "audit" / "explain.json", doc)
        result["explain"] = doc
        logger.info(
            f"explanations: {len(exps)} texts, completeness |delta| mean {doc['completeness']['mean_abs_delta']:.2e}; "
            f"comprehensiveness {faith.get('comprehensiveness', float('nan')):.3f} (random "
            f"{faith.get('comprehensiveness_random', float('nan')):.3f}), sufficiency "
            f"{faith.get('sufficiency', float('nan')):.3f} (random {faith.get('sufficiency_random', float('nan')):.3f})"
        )
    if cfg.fairness:
        t0 = time.perf_counter()
        f = cfg.fairness
        texts, y, column = _split(t.recipe, tok, f.split, f.max_examples, f.groups == "column", run_dir)
        if not texts:
            raise KeelError(f"audit.fairness needs a non-empty {f.split} split; set data.split.{f.split} above 0")

        def predict_proba(batch):
            return ex.probabilities(model, tok, batch, max_len)

        probs = predict_proba(texts)
        fit_split = None
        if f.mitigation == "threshold-optimizer" and f.split == "test":
            vt, vy, vcol = _split(t.recipe, tok, "validation", f.max_examples, f.groups == "column", run_dir)
            fit_split = {"texts": vt, "y": vy, "column": vcol, "probs": predict_proba(vt) if vt else None}
        doc = fair.audit(texts, y, probs, labels, f, predict_proba, column, fit_split)
        doc["split"], doc["seconds"] = f.split, round(time.perf_counter() - t0, 1)
        if f.baseline_run:
            base = Path(f.baseline_run) / "audit" / "fairness.json"
            if not base.is_file():
                raise RecipeError(
                    f"audit.fairness.baseline_run: {base} not found; run `keel audit {f.baseline_run}` first"
                )
            doc["baseline"] = {"run": f.baseline_run, **json.loads(base.read_text())}
            doc["baseline"].pop("baseline", None)
        if f.mitigation == "threshold-optimizer":
            from keel.trust.mitigation import write_thresholds

            write_thresholds(run_dir, doc["mitigation"], doc["positive_label"])  # what predict and serve apply
        atomic_write_json(run_dir / "audit" / "fairness.json", doc)
        result["fairness"] = doc
        _log_fairness(doc)
    failures = fair.check_gates(result.get("fairness"), cfg.gates)
    unmeasurable = fair.unmeasurable_gates(result.get("fairness"), cfg.gates)
    gates = {
        "failures": failures,
        "unmeasurable": unmeasurable,
        "on_unmeasurable": cfg.gates.on_unmeasurable,
        "checked": cfg.gates.thresholds(),
    }
    atomic_write_json(run_dir / "audit" / "gates.json", gates)
    result["gates"] = gates
    for line in unmeasurable:
        logger.warning(f"gate not evaluated: {line}")
    from keel.trust.card import write_model_card

    write_model_card(run_dir)
    if failures and check_gates:
        raise GateError(
            "fairness gate failed: " + "; ".join(failures) + f" (details: {run_dir / 'audit'}; "
            "mitigate with audit.fairness.mitigation, or change the threshold in audit.gates)"
        )
    if unmeasurable and cfg.gates.on_unmeasurable == "fail" and check_gates:
        raise GateError(
            "fairness gate cannot be evaluated: " + "; ".join(unmeasurable) + "; audit more examples "
            "(audit.fairness.max_examples, a larger split), lower audit.fairness.min_group_size, or set "
            "audit.gates.on_unmeasurable=warn to go on without it"
        )
    return result


def _log_fairness(doc: dict) -> None:
    # group names may come from a data column: escaped, never read as console markup
    for attr, r in doc["attributes"].items():
        if r["ranked_groups"]:
            dp, eo = r["demographic_parity_difference"], r["equalized_odds_difference"]
            logger.info(
                f"fairness ({attr}): groups {', '.join(r['ranked_groups'])}; demographic parity difference "
                f"{'n/a' if dp is None else f'{dp:.3f}'}, equalized odds difference {'n/a' if eo is None else f'{eo:.3f}'}"
            )
        else:
            small = [f"{g['group']} ({g['n']})" for g in r["groups"] if g["group"] not in ("none", "several")]
            logger.info(
                f"fairness ({attr}): no group with {doc['min_group_size']}+ examples to rank"
                + (f"; flagged: {', '.join(small)}" if small else "")
            )
    cf = (doc.get("counterfactual") or {}).get("all")
    if cf and cf["n"]:
        logger.info(
            f"counterfactual swaps: {cf['n']} texts, flip rate {cf['flip_rate']:.3f}, mean |score change| "
            f"{cf['mean_abs_score_change']:.4f}"
            + (f"; {cf['ambiguous']} texts left out (a pronoun of ambiguous role)" if cf.get("ambiguous") else "")
        )
