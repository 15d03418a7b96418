"""The audit's ThresholdOptimizer, applied where the model is used: `keel predict` and `keel serve`.

The audit fits Fairlearn's ThresholdOptimizer on the validation split and stores its per-group thresholds in
RUN_DIR/audit/thresholds.json. At predict and serve time the same thresholds are rebuilt into Fairlearn's own
InterpolatedThresholder and applied to the model's P(positive), for the group the text names.

When that is sound, and only then:
- groups come from keel's identity-term lexicon, which reads the text itself, so a served text's group is known;
  groups from a data column are not part of a request, so such a run is served unmitigated (and says so);
- the model is the one the thresholds were fitted on: this run's model (PyTorch, or its fp32 ONNX export, checked
  against it at export); a compressed or int8 variant scores differently and is served unmitigated (and says so).

The optimizer's decision is randomized between two thresholds for some groups; each text draws its number from a
hash of the text, so one text always gets the same answer and the group's rates match what the audit measured.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from keel.trust import lexicon

FILE = ("audit", "thresholds.json")
SOUND_BACKENDS = ("torch", "onnx")  # the audited weights; int8 and compressed variants score differently


def model_fingerprint(run_dir: Path) -> str:
    """The audited model's identity: the sha256 of its sealed manifest (which lists every weight file's hash)."""
    return hashlib.sha256((Path(run_dir) / "model" / "manifest.json").read_bytes()).hexdigest()


def _threshold(x) -> float:
    return float(x)  # also "inf" / "-inf"


def interpolation_json(opt) -> dict:
    """A fitted ThresholdOptimizer's per-group interpolation as JSON (+-inf thresholds are written as strings)."""

    def op(o) -> dict:
        t = float(o.threshold)
        return {"operator": o.operator, "threshold": t if math.isfinite(t) else ("inf" if t > 0 else "-inf")}

    per_group = {}
    for g, b in opt.interpolated_thresholder_.interpolation_dict.items():
        entry = {"p0": float(b.p0), "operation0": op(b.operation0), "p1": float(b.p1), "operation1": op(b.operation1)}
        if "p_ignore" in b:
            entry.update(p_ignore=float(b.p_ignore), prediction_constant=float(b.prediction_constant))
        per_group[str(g)] = entry
    return per_group


def write_thresholds(run_dir: Path, mit: dict, positive_label: str) -> None:
    """RUN_DIR/audit/thresholds.json for predict and serve, when the audit's mitigation can be served; else none."""
    from keel.io import atomic_write_json

    path = Path(run_dir).joinpath(*FILE)
    if not (mit.get("served") or {}).get("applied"):
        path.unlink(missing_ok=True)  # a stale file from an earlier audit must not be applied
        return
    atomic_write_json(
        path,
        {
            "attribute": mit["attribute"],
            "source": "lexicon",
            "groups": mit["groups"],
            "positive_label": positive_label,
            "constraint": mit["constraint"],
            "thresholds": mit["thresholds"],
            "model_sha256": model_fingerprint(run_dir),
            "backends": list(SOUND_BACKENDS),
        },
    )


def score_estimator():
    """A fitted 'estimator' whose input is already the model's P(positive): ThresholdOptimizer(prefit=True)."""
    from sklearn.base import BaseEstimator, ClassifierMixin

    class ScoreAsEstimator(ClassifierMixin, BaseEstimator):
        def fit(self, X, y):
            self.classes_ = np.array([0, 1])
            return self

        def predict_proba(self, X):
            s = np.asarray(X, dtype=float).reshape(-1)
            return np.stack([1 - s, s], axis=1)

        def predict(self, X):
            return (np.asarray(X, dtype=float).reshape(-1) >= 0.5).astype(int)

    return ScoreAsEstimator().fit(None, None)


def thresholder(doc: dict):
    """Fairlearn's InterpolatedThresholder rebuilt from ``to_json``'s document (over scores = P(positive))."""
    from fairlearn.postprocessing._interpolated_thresholder import InterpolatedThresholder
    from fairlearn.postprocessing._threshold_operation import ThresholdOperation
    from sklearn.utils import Bunch

    interpolation = {}
    for g, e in doc["thresholds"].items():
        b = Bunch(
            p0=e["p0"],
            p1=e["p1"],
            operation0=ThresholdOperation(e["operation0"]["operator"], _threshold(e["operation0"]["threshold"])),
            operation1=ThresholdOperation(e["operation1"]["operator"], _threshold(e["operation1"]["threshold"])),
        )
        if "p_ignore" in e:
            b.update(p_ignore=e["p_ignore"], prediction_constant=e["prediction_constant"])
        interpolation[g] = b
    return InterpolatedThresholder(score_estimator(), interpolation, prefit=True, predict_method="predict_proba").fit(
        None, None
    )


def text_draw(text: str) -> float:
    """A number in [0, 1) fixed by the text: the randomized decision is the same for the same text."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


def decide(thr, groups: list[str], texts: list[str], score: np.ndarray, fitted: list[str]) -> np.ndarray:
    """Mitigated binary decisions (1 = positive) for texts of fitted groups; -1 where the group is not fitted."""
    out = np.full(len(texts), -1, dtype=int)
    idx = [i for i, g in enumerate(groups) if g in fitted]
    if idx:
        pmf = thr._pmf_predict(
            np.asarray(score)[idx].reshape(-1, 1), sensitive_features=np.asarray(groups, dtype=object)[idx]
        )[:, 1]  # P(positive decision)
        draws = np.array([text_draw(texts[i]) for i in idx])
        out[idx] = (pmf >= draws).astype(int)  # as Fairlearn's predict: positive when p >= the draw
    return out


class Mitigator:
    """What `keel predict` and `keel serve` apply on top of the model's probabilities (see the module docstring)."""

    def __init__(self, doc: dict | None, status: dict):
        self.doc, self.status = doc, status
        self._thr = thresholder(doc) if doc else None

    @classmethod
    def for_run(cls, run_dir: str | Path, backend: str) -> Mitigator | None:
        """None when the run asked for no threshold-optimizer; else one that applies it or says why it cannot."""
        run_dir = Path(run_dir)
        fair = _read(run_dir / "audit" / "fairness.json")
        mit = (fair or {}).get("mitigation")
        if not mit:
            if _asks_for_thresholds(run_dir):
                return cls(
                    None,
                    {
                        "applied": False,
                        "reason": "the run asks for audit.fairness.mitigation="
                        "threshold-optimizer but has not been audited yet; run `keel audit` on it",
                    },
                )
            return None
        served = mit.get("served") or {}
        if not served.get("applied"):
            return cls(
                None,
                {
                    "applied": False,
                    "reason": served.get("reason") or mit.get("reason") or "the audit fitted no thresholds",
                },
            )
        doc = _read(run_dir.joinpath(*FILE))
        if not doc:
            return cls(None, {"applied": False, "reason": f"{run_dir.joinpath(*FILE)} is missing; run `keel audit`"})
        if backend not in doc["backends"]:
            return cls(
                None,
                {
                    "applied": False,
                    "reason": f"the {backend} variant is not the audited model (thresholds "
                    f"were fitted on {', '.join(doc['backends'])}); it is served unmitigated",
                },
            )
        if doc["model_sha256"] != model_fingerprint(run_dir):
            return cls(None, {"applied": False, "reason": "the model changed since the audit; run `keel audit` again"})
        return cls(doc, {"applied": True, "attribute": doc["attribute"], "constraint": doc["constraint"]})

    def apply(self, texts: list[str], probs: np.ndarray, labels: list[str]) -> tuple[list[int], list[dict]]:
        """(label index, mitigation info) per text; ``probs`` (N, C) are the model's probabilities."""
        probs = np.asarray(probs, dtype=float)
        best = probs.argmax(-1)
        if self._thr is None:
            return best.tolist(), [dict(self.status) for _ in texts]
        attr, pos = self.doc["attribute"], labels.index(self.doc["positive_label"])
        groups = [lexicon.group_label(t, attr) for t in texts]
        decision = decide(self._thr, groups, texts, probs[:, pos], self.doc["groups"])
        out, info = [], []
        for i, (g, d) in enumerate(zip(groups, decision)):
            if d < 0:
                out.append(int(best[i]))
                info.append(
                    {
                        "applied": False,
                        "attribute": attr,
                        "group": g,
                        "reason": "no threshold for this group (none, several, or too small when fitted)",
                    }
                )
                continue
            if d == 1:
                k = pos
            else:  # not the positive outcome: the most probable other label
                rest = probs[i].copy()
                rest[pos] = -1.0
                k = int(best[i]) if best[i] != pos else int(rest.argmax())
            out.append(k)
            info.append({"applied": True, "attribute": attr, "group": g, "changed": k != int(best[i])})
        return out, info


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def default_serve_backend(run_dir: Path) -> str:
    """The variant `keel serve RUN_DIR` (and serve.backend=auto) picks (keel/rundir.py)."""
    from keel.rundir import serve_variant

    try:
        return serve_variant(Path(run_dir), "auto")
    except Exception:  # noqa: BLE001  (a half-written compress folder: the card still says what it knows)
        return "torch"


def served_statement(run_dir: Path, mit: dict | None) -> str | None:
    """One plain sentence for the model card and the report: is the model that predict/serve use mitigated?"""
    if not mit:
        return None
    served = mit.get("served") or {}
    if not served.get("applied"):
        return (
            f"The served model is unmitigated: `keel predict` and `keel serve` give the model's own decisions "
            f"({served.get('reason') or mit.get('reason') or 'no thresholds were fitted'})."
        )
    backend = default_serve_backend(run_dir)
    line = (
        f"`keel predict` and `keel serve` apply these per-group thresholds to this run's model (backends "
        f"{' and '.join(SOUND_BACKENDS)}), for the {mit['attribute']} group the lexicon finds in each text, and "
        "report it per text; compressed and int8 variants score differently and are served unmitigated."
    )
    if backend not in SOUND_BACKENDS:
        line += (
            f" `keel serve` picks the {backend} variant by default, so the served model is unmitigated unless "
            "serve.backend=torch or onnx."
        )
    return line


def _asks_for_thresholds(run_dir: Path) -> bool:
    import yaml

    try:
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    fairness = ((recipe.get("audit") or {}).get("fairness") or {}) if isinstance(recipe, dict) else {}
    return isinstance(fairness, dict) and fairness.get("mitigation") == "threshold-optimizer"
