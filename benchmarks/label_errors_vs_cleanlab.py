"""keel's confident learning against cleanlab's ``find_label_issues`` on the SAME out-of-fold probabilities.

Takes the tweets' training split (keel's split of ``tweets-sentiment``, the first --n rows), flips --flip of the
labels to another class at random (seeded), computes k-fold out-of-fold probabilities with keel's linear probe
(TF-IDF, or --features minilm-l6), and saves labels + probabilities as safetensors (in the temporary folder;
a rerun with the same settings reuses them). cleanlab (AGPL-3.0, so never a
keel dependency) is installed in a separate virtual environment (--venv, created on first use with
``python -m venv`` + ``pip install cleanlab==2.9.*``) and runs on that file in its own process. Prints recall and
precision of both against the planted flips, and how far the two agree; writes
benchmarks/results/label-errors-vs-cleanlab.json.

    .venv/bin/python benchmarks/label_errors_vs_cleanlab.py [--n 8000] [--flip 0.1] [--features tfidf]
        [--venv $TMPDIR/keel-cleanlab-venv]

The tweets carry label noise of their own, so "precision against planted flips" counts the tweets whose original
label was already wrong as false positives for both tools alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

CLEANLAB_SCRIPT = """
import json, sys
import numpy as np
from safetensors.numpy import load_file
from cleanlab.filter import find_label_issues
import cleanlab
t = load_file(sys.argv[1])
mask = find_label_issues(labels=t["labels"], pred_probs=t["probs"].astype(np.float64))
json.dump({"version": cleanlab.__version__, "issues": np.flatnonzero(mask).tolist()}, open(sys.argv[2], "w"))
"""


def _venv(path: Path) -> Path:
    python = path / "bin" / "python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "cleanlab==2.9.*", "safetensors", "numpy", "scikit-learn"],
            check=True,
        )
    return python


def _arg(argv: list[str], name: str, default):
    return type(default)(argv[argv.index(name) + 1]) if name in argv else default


def _scores(found: set, planted: set) -> dict:
    hit = len(found & planted)
    return {
        "flagged": len(found),
        "recall": hit / max(len(planted), 1),
        "precision": hit / max(len(found), 1),
    }


def main(argv: list[str]) -> dict:
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from keel.data.curate.label_errors import features, find_label_issues, out_of_fold_probs
    from keel.data.load import load_splits
    from keel.recipe import DataConfig

    n, flip = _arg(argv, "--n", 8000), _arg(argv, "--flip", 0.1)
    default_venv = str(Path(tempfile.gettempdir()) / "keel-cleanlab-venv")
    kind, venv = _arg(argv, "--features", "tfidf"), Path(_arg(argv, "--venv", default_venv))
    raw = load_splits(DataConfig(name="tweets-sentiment"), "classification")
    train = raw.train.iloc[:n]
    index = {name: i for i, name in enumerate(raw.labels)}
    original = np.array([index[y] for y in train["label"]])
    rng = np.random.default_rng(0)
    flipped = rng.choice(len(original), size=int(flip * len(original)), replace=False)
    labels = original.copy()
    labels[flipped] = (original[flipped] + rng.integers(1, len(raw.labels), size=len(flipped))) % len(raw.labels)
    planted = set(flipped.tolist())

    start = time.perf_counter()
    saved = Path(tempfile.gettempdir()) / f"keel-label-probs-{kind}-{len(labels)}-{flip}.safetensors"
    if saved.is_file() and (load_file(str(saved))["labels"] == labels).all():  # a rerun: the same probabilities
        probs = load_file(str(saved))["probs"]
    else:
        probs = out_of_fold_probs(features(train["text"].tolist(), kind), labels, folds=5, seed=0)  # (n, K)
        probs = probs.astype(np.float32)  # both sides read exactly the values saved
        save_file({"labels": labels.astype(np.int64), "probs": probs}, str(saved))
    probe_s = time.perf_counter() - start
    start = time.perf_counter()
    ours = set(np.flatnonzero(find_label_issues(labels, probs)[0]).tolist())
    ours_s = time.perf_counter() - start
    overlapping = set(np.flatnonzero(find_label_issues(labels, probs, exclusive=False)[0]).tolist())

    with tempfile.TemporaryDirectory() as tmp:
        probs_file, out_file = saved, Path(tmp) / "cleanlab.json"
        script = Path(tmp) / "run_cleanlab.py"
        script.write_text(CLEANLAB_SCRIPT)
        python = _venv(venv)
        start = time.perf_counter()
        subprocess.run([str(python), str(script), str(probs_file), str(out_file)], check=True)
        theirs_s = time.perf_counter() - start
        doc = json.loads(out_file.read_text())
    theirs = set(doc["issues"])

    both = ours & theirs
    result = {
        "data": f"tweets-sentiment train split, first {len(labels)} rows, {len(planted)} labels flipped (seed 0)",
        "features": kind,
        "probe_accuracy_vs_given": float(np.mean(probs.argmax(1) == labels)),
        "keel": {**_scores(ours, planted), "seconds": round(ours_s, 3)},
        "cleanlab": {**_scores(theirs, planted), "version": doc["version"], "seconds_with_startup": round(theirs_s, 1)},
        "agreement": {
            "both": len(both),
            "only_keel": len(ours - theirs),
            "only_cleanlab": len(theirs - ours),
            "jaccard": len(both) / max(len(ours | theirs), 1),
            "same_decision": 1 - len(ours ^ theirs) / len(labels),
        },
        "keel_overlapping_picks": {
            **_scores(overlapping, planted),
            "same_as_cleanlab": overlapping == theirs,
            "differ": len(overlapping ^ theirs),
        },
        "probe_seconds": round(probe_s, 1),
    }
    print(f"{'':10} {'flagged':>8} {'recall':>8} {'precision':>10}")
    for who in ("keel", "cleanlab"):
        r = result[who]
        print(f"{who:10} {r['flagged']:>8} {r['recall']:>8.3f} {r['precision']:>10.3f}")
    a = result["agreement"]
    print(
        f"agreement: {a['both']} flagged by both, {a['only_keel']} only keel, {a['only_cleanlab']} only cleanlab "
        f"(Jaccard {a['jaccard']:.3f}, same decision on {a['same_decision']:.2%} of rows)"
    )
    o = result["keel_overlapping_picks"]
    print(
        f"keel with exclusive=False (a row may be picked by two cells, as cleanlab does): {o['flagged']} flagged, "
        f"{o['differ']} rows differ from cleanlab"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "label-errors-vs-cleanlab.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
