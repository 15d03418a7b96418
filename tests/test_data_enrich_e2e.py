"""End to end through the CLI: `keel run` with data.weak and data.augment on a user's CSV, then `keel label`;
and the one-line refusals (a labelling-function file with a syntax error, a pool without the text column)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import OFFLINE, TINY_RECIPE, keel

pytestmark = pytest.mark.slow

LFS = """
def lf_good(text):
    return "pos" if any(w in text for w in ("great", "lovely", "excellent", "wonderful", "happy")) else None

def lf_bad(text):
    return "neg" if any(w in text for w in ("awful", "terrible", "horrible", "sad", "broken")) else None

def lf_sad(text):
    return "neg" if "sad" in text else None
"""


def _keel_with_stdin(*args, cwd, stdin: str) -> subprocess.CompletedProcess:
    """conftest's keel(), with the person's answers on stdin."""
    return subprocess.run(
        [sys.executable, "-m", "keel", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **OFFLINE},
    )


def _one_line_error(proc, *says):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
    for s in says:
        assert s in lines[0], lines[0]


def test_run_with_weak_labels_and_augmentation_then_a_labelling_session(tmp_path, toy_csv):
    (tmp_path / "lfs.py").write_text(LFS)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        TINY_RECIPE.format(data=toy_csv, epochs=1, every=0).replace(
            "  split:", "  weak: {functions: lfs.py}\n  augment: {ops: [synonym, swap, typo], copies: 2}\n  split:"
        )
    )
    proc = keel("run", str(recipe), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "importing labelling functions from" in proc.stderr and "user code" in proc.stderr
    run = tmp_path / "runs" / "tiny"
    weak = json.loads((run / "data" / "weak.json").read_text())
    assert weak["versus_gold"]["majority vote"]["accuracy"] == 1.0  # the toy's words give the label away
    aug = json.loads((run / "data" / "augment.json").read_text())
    assert aug["train_before"] == weak["kept"] and aug["added"] > 0  # copies of the weakly labelled texts
    page = (run / "report.html").read_text()
    assert "<h2>Weak supervision</h2>" in page and "<h2>Augmentation</h2>" in page

    pool = tmp_path / "pool.csv"
    pool.write_text("text\n" + "".join(f"the tram was {'great' if i % 2 else 'awful'} on day {i}\n" for i in range(8)))
    proc = _keel_with_stdin(
        "label", str(run), "--pool", str(pool), "--batch-size", "2", "--rounds", "2", cwd=tmp_path, stdin="1\n2\ns\n1\n"
    )
    assert proc.returncode == 0, proc.stderr
    (store,) = [p for p in (run / "labels").glob("pool-*.jsonl") if not p.name.endswith(".rounds.jsonl")]
    stored = [json.loads(x) for x in store.read_text().splitlines() if x.strip()]
    assert [e["label"] for e in stored] == ["neg", "pos", "neg"]
    assert "Active learning" in (run / "report.html").read_text()

    bad_pool = tmp_path / "bad.csv"
    bad_pool.write_text("body\nhello\n")
    _one_line_error(
        keel("label", str(run), "--pool", str(bad_pool), cwd=tmp_path), "has no column 'text'", "--text-column"
    )


def test_a_labelling_function_file_with_a_syntax_error_is_one_line_at_validate(tmp_path, toy_csv):
    (tmp_path / "lfs.py").write_text("def lf_x(text)\n    return None\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        TINY_RECIPE.format(data=toy_csv, epochs=1, every=0).replace("  split:", "  weak: {functions: lfs.py}\n  split:")
    )
    _one_line_error(keel("validate", str(recipe), cwd=tmp_path), "lfs.py line 1: syntax error")
    _one_line_error(keel("run", str(recipe), cwd=tmp_path), "lfs.py line 1: syntax error")
    assert not (tmp_path / "runs").exists()  # refused before a run directory exists
    _one_line_error(keel("validate", str(recipe), "data.augment.alpha=0.9", cwd=tmp_path), "alpha")
    (tmp_path / "lfs.py").write_text(LFS.split("def lf_bad")[0])  # one function: no label model (and nothing ran)
    snorkel = "data.weak.label_model=snorkel"
    _one_line_error(keel("validate", str(recipe), snorkel, cwd=tmp_path), "needs at least 3 labelling functions")
    assert keel("validate", str(recipe), cwd=tmp_path).returncode == 0  # auto: majority vote, said in weak.json
