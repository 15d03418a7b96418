"""Strings from outside (labels, texts, file and site names) reach the terminal and the report as typed.

Rich parses ``[...]`` as markup: unescaped, a label ``[/b]`` raises (a traceback after a finished training run)
and ``[red]x[/red]`` prints as ``x``. HTML in a text must stay text in report.html.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import keel

CLOSE, COLOUR, HTML = "[/b]", "[red]x[/red]", "<b>bold</b>"

RECIPE = """
name: marks
task: classification
model: {name: tiny-bert, max_length: 32}
data:
  path: "m[red]x.csv"
  columns: {text: text, label: label, group: group}
  split: {validation: 0.2, test: 0.2, seed: 0}
train: {epochs: 1, batch_size: 8, lr: 3.0e-3, warmup_ratio: 0.0}
audit:
  explain: {n_steps: 4, max_examples: 6, heatmaps: 2, attention_rollout: false}
  fairness: {groups: column, min_group_size: 2, counterfactual: false}
"""


def _markup_csv(path, n: int = 90):
    """Labels that are rich markup ([/b] the majority, so it is the baseline printed), texts with markup and HTML,
    fairness groups named like markup and HTML."""
    lines = ["text,label,group"]
    for i in range(n):
        label, word = (CLOSE, "great") if i % 3 else (COLOUR, "awful")
        lines.append(f'"{HTML} [/i] it was {word} number {i}",{label},{"[/g]" if i % 2 else "<i>g</i>"}')
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def marked_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("marks")
    _markup_csv(work / "m[red]x.csv")
    (work / "r.yaml").write_text(RECIPE)
    proc = keel("run", "r.yaml", cwd=work)
    return work, work / "runs" / "marks", proc


def _clean(proc, code: int = 0):
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "MarkupError" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_run_and_eval_print_markup_labels_as_typed(marked_run):
    work, run_dir, proc = marked_run
    _clean(proc)
    assert f"majority-class baseline (the training split's most frequent label, '{CLOSE}')" in proc.stdout
    _clean(proc := keel("eval", str(run_dir), cwd=work))
    assert f"most frequent label, '{CLOSE}')" in proc.stdout
    _clean(proc := keel("validate", "r.yaml", cwd=work))
    assert "m[red]x.csv" in proc.stdout


@pytest.mark.slow
def test_predict_and_explain_print_texts_and_labels_as_typed(marked_run):
    work, run_dir, _ = marked_run
    text = f"{COLOUR} {HTML} it was awful number 3"
    _clean(proc := keel("predict", str(run_dir), text, cwd=work))
    assert COLOUR in proc.stdout and HTML in proc.stdout
    _clean(proc := keel("predict", str(run_dir), text, "--json", cwd=work))
    assert json.loads(proc.stdout)["text"] == text
    _clean(proc := keel("explain", str(run_dir), text, "--steps", "4", cwd=work))
    assert CLOSE in proc.stdout or COLOUR in proc.stdout  # the predicted label, as typed


@pytest.mark.slow
def test_audit_and_report_keep_html_as_text(marked_run):
    work, run_dir, proc = marked_run  # the run's audit stage ranked the groups [/g] and <i>g</i>
    assert "[/g]" in proc.stderr and "<i>g</i>" in proc.stderr
    _clean(keel("report", str(run_dir), cwd=work))
    page = (run_dir / "report.html").read_text()
    assert HTML not in page and "<i>g</i>" not in page and "&lt;i&gt;g&lt;/i&gt;" in page
    assert "[/b]" in page and "could not be built" not in page


@pytest.mark.slow
def test_errors_naming_a_markup_file_are_one_line(tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE)
    proc = keel("train", "r.yaml", cwd=tmp_path)  # the data file m[red]x.csv is missing
    _clean(proc, code=2)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "m[red]x.csv" in errors[0]
    proc = keel("eval", "runs/[red]x[/red]", cwd=tmp_path)
    _clean(proc, code=2)
    assert "runs/[red]x[/red]" in proc.stderr


def test_a_site_named_like_markup_is_rejected_by_name(capsys):
    from test_federated import fit_res, make_guard

    ref = [np.zeros((2, 2), np.float32)]
    good = [np.ones((2, 2), np.float32)]
    guard = make_guard(ref, sampled=3, min_completion=0.3)
    bad = [np.full((2, 2), np.nan, np.float32)]
    guard.aggregate_fit(1, [fit_res(good, 1, "ok"), fit_res(bad, 1, "[/x]"), fit_res(bad, 1, COLOUR)], [])
    err = capsys.readouterr().err
    assert "rejected the update of site [/x]" in err and f"rejected the update of site {COLOUR}" in err


def test_log_lines_print_markup_as_typed(capsys):
    import logging

    logger = logging.getLogger("keel.test")
    logger.info(f"a site {CLOSE} and a label {COLOUR}")  # log messages are plain text: never parsed as markup
    logger.warning(f"site {CLOSE} left")
    err = capsys.readouterr().err
    assert f"a site {CLOSE} and a label {COLOUR}" in err and f"warning: site {CLOSE} left" in err
    assert "\\" not in err  # nothing escaped for rich either
