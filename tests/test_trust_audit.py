"""End to end: `keel run` with an audit section, `keel audit`, `keel explain`, the fairness gate (exit 3),
MODEL_CARD.md, and the report rendered in a real headless browser."""

import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import keel

pytestmark = pytest.mark.slow  # runs `keel run` with audits, and `keel serve`

RECIPE = """
name: fair
task: classification
model: {{name: tiny-bert, max_length: 32}}
data:
  path: {data}
  columns: {{text: text, label: label, group: region}}
  split: {{validation: 0.2, test: 0.2, seed: 0}}
train: {{epochs: 4, batch_size: 8, lr: 3.0e-3, warmup_ratio: 0.0}}
audit:
  explain: {{max_examples: 16, n_steps: 8, heatmaps: 4, top_k: 1}}
  fairness: {{groups: lexicon, min_group_size: 5, mitigation: threshold-optimizer}}
"""


def write_people_csv(path: Path, n: int = 200) -> Path:
    """Sentiment given away by a word; pronouns and religions sprinkled in; region planted to track the label."""
    rng = random.Random(0)
    good, bad = ["great", "lovely", "excellent", "happy"], ["awful", "terrible", "horrible", "sad"]
    who = ["he", "she", "my mother", "my father", "a christian", "a muslim", "the driver", "the rider"]
    lines = ["text,label,region"]
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        region = (
            ("north" if rng.random() < 0.9 else "south")
            if label == "pos"
            else ("south" if rng.random() < 0.9 else "north")
        )
        word = rng.choice(good if label == "pos" else bad)
        lines.append(f"{rng.choice(who)} said the ride was {word} number {i},{label},{region}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    work = tmp_path_factory.mktemp("audit")
    csv = write_people_csv(work / "people.csv")
    (work / "fair.yaml").write_text(RECIPE.format(data=csv))
    proc = keel("run", "fair.yaml", cwd=work, check=True)
    return work, work / "runs" / "fair", proc


def test_run_writes_audit_card_and_report(audited):
    work, run_dir, proc = audited
    exp = json.loads((run_dir / "audit/explain.json").read_text())
    assert exp["n"] == 16 and exp["completeness"]["mean_abs_delta"] < 0.05
    f = exp["faithfulness"]
    assert {"comprehensiveness", "comprehensiveness_random", "sufficiency", "sufficiency_random"} <= set(f)
    assert len(exp["examples"]) == 4 and exp["examples"][0]["rollout"]
    fair = json.loads((run_dir / "audit/fairness.json").read_text())
    assert set(fair["attributes"]) >= {"gender", "religion"}
    gender = {g["group"]: g for g in fair["attributes"]["gender"]["groups"]}
    assert {"male", "female", "none"} <= set(gender)
    assert gender["none"]["ranked"] is False
    assert sum(g["n"] for g in gender.values()) == fair["n"] == 40
    cf = fair["counterfactual"]
    assert cf["gender"]["n"] > 0 and 0 <= cf["gender"]["flip_rate"] <= 1
    assert "mitigation" in fair
    card = (run_dir / "model/MODEL_CARD.md").read_text()
    for heading in (
        "Model details",
        "Intended use",
        "Factors",
        "Metrics",
        "Evaluation data",
        "Training data",
        "Quantitative analyses",
        "Ethical considerations",
        "Caveats and recommendations",
    ):
        assert f"## {heading}" in card
    test = json.loads((run_dir / "eval/test.json").read_text())
    assert f"{test['accuracy']:.4f}" in card  # filled from the run's own numbers
    page = (run_dir / "report.html").read_text()
    for h in ("Data", "Fairness", "Explanations", "Environment", "Test set", "Training curves"):
        assert f"<h2>{h}</h2>" in page
    assert "explanations:" in proc.stderr and "fairness (gender)" in proc.stderr


def test_keel_explain_prints_attributions(audited):
    work, run_dir, _ = audited
    import os
    import sys

    from conftest import OFFLINE

    proc = subprocess.run(
        [sys.executable, "-m", "keel", "explain", str(run_dir), "-", "--json", "--steps", "16"],
        cwd=work,
        input="she said the ride was great\nhe said the ride was awful\n",
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE},
        timeout=300,
        check=True,
    )
    rows = [json.loads(x) for x in proc.stdout.splitlines()]
    assert len(rows) == 2
    row = rows[0]
    assert row["tokens"][0] == "[CLS]" and len(row["tokens"]) == len(row["attributions"])
    assert row["label"] in ("pos", "neg") and abs(row["delta"]) < 0.05
    plain = keel("explain", str(run_dir), "he said the ride was awful", cwd=work, check=True)
    assert "completeness delta" in plain.stdout and "awful" in plain.stdout
    bad = keel("explain", str(run_dir / "nope"), "x", cwd=work)
    assert bad.returncode == 2 and "not found" in bad.stderr and "Traceback" not in bad.stderr


def test_fairness_gate_fails_the_run_with_exit_3(audited):
    work, _, _ = audited
    proc = keel(
        "run",
        "fair.yaml",
        "audit.fairness.groups=column",
        "audit.gates.max_demographic_parity_difference=0.1",
        "audit.explain=null",
        "output.dir=runs/gated",
        cwd=work,
    )
    assert proc.returncode == 3, proc.stderr
    assert "fairness gate failed: demographic parity difference" in proc.stderr and "Traceback" not in proc.stderr
    run_dir = work / "runs/gated"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "gate failed"
    assert "gate failed" in (run_dir / "report.html").read_text()  # the report is still written
    # `keel audit` re-checks the same gates
    again = keel("audit", str(run_dir), cwd=work)
    assert (
        again.returncode == 3
        and "max_demographic_parity_difference" in again.stderr
        and "Traceback" not in again.stderr
    )
    assert "MODEL_CARD.md" in again.stdout
    # groups from a data column: a served request does not carry the column, so the served model is unmitigated,
    # and the card, the report and every prediction say so
    assert not (run_dir / "audit/thresholds.json").exists()
    card = (run_dir / "model/MODEL_CARD.md").read_text()
    assert "The served model is unmitigated" in card and "data column" in card
    assert "The served model is unmitigated" in (run_dir / "report.html").read_text()
    rows = _predict(work, run_dir, ["she said the ride was great"])
    assert rows[0]["mitigation"]["applied"] is False and "data column" in rows[0]["mitigation"]["reason"]


def _predict(work, run_dir, texts):
    import os
    import sys

    from conftest import OFFLINE

    proc = subprocess.run(
        [sys.executable, "-m", "keel", "predict", str(run_dir), "-", "--json"],
        cwd=work,
        input="\n".join(texts) + "\n",
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE},
        timeout=300,
        check=True,
    )
    return [json.loads(x) for x in proc.stdout.splitlines()]


def test_predict_and_serve_apply_the_audits_thresholds(audited):
    import httpx
    from serve_helpers import Server

    from keel.data.load import load_splits
    from keel.recipe import load_recipe
    from keel.trust import lexicon

    work, run_dir, _ = audited
    fair = json.loads((run_dir / "audit/fairness.json").read_text())
    mit = fair["mitigation"]
    assert mit["applied"] and mit["served"]["applied"] and (run_dir / "audit/thresholds.json").is_file()
    # `keel predict` on the audited texts gives exactly the decisions the report shows after mitigation
    texts = list(load_splits(load_recipe(run_dir / "recipe.yaml").data, "classification").test["text"])
    assert len(texts) == fair["n"]
    rows = _predict(work, run_dir, texts)
    attr, pos = mit["attribute"], fair["positive_label"]
    groups = [lexicon.group_label(t, attr) for t in texts]
    for g in mit["after"]["groups"]:
        picked = [r["label"] == pos for r, grp in zip(rows, groups) if grp == g["group"]]
        assert sum(picked) / len(picked) == pytest.approx(g["selection_rate"]), g
    assert all(r["mitigation"]["applied"] == (grp in mit["groups"]) for r, grp in zip(rows, groups))
    card = (run_dir / "model/MODEL_CARD.md").read_text()
    assert "`keel predict` and `keel serve` apply these per-group thresholds" in card
    # `keel serve` applies the same thresholds on the served scores and reports it per text
    mentioned = next(t for t, grp in zip(texts, groups) if grp in mit["groups"])
    plain = "the rider said the ride was great number 1"
    server = Server(str(run_dir), cwd=work)
    try:
        body = httpx.post(f"{server.url}/v1/classify", json={"input": [mentioned, plain]}, timeout=60).json()
    finally:
        server.stop()
    served, other = body["data"]
    assert served["mitigation"]["applied"] and served["mitigation"]["attribute"] == attr
    assert served["label"] == _predict(work, run_dir, [mentioned])[0]["label"]
    assert other["mitigation"] == {
        "applied": False,
        "attribute": attr,
        "group": "none",
        "reason": other["mitigation"]["reason"],
    }


# -- the report in a real browser ----------------------------------------------------------------

HOOK = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push('error: ' + e.message), true);
const _ce = console.error; console.error = (...a) => { window.__errors.push('console: ' + a.join(' ')); _ce(...a); };
window.addEventListener('load', () => {
  const bad = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length;
  const pre = document.createElement('pre'); pre.id = '__probe';
  pre.textContent = JSON.stringify({errors: window.__errors, images: document.images.length, broken: bad,
    sections: [...document.querySelectorAll('h2')].map(h => h.textContent)});
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    _chromium() is None, reason="chromium is not installed (apt-get install chromium); .ci/run installs it"
)
def test_report_renders_in_headless_chromium(audited, tmp_path):
    _, run_dir, _ = audited
    page = (run_dir / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("<head>", "<head>" + HOOK, 1))  # the hook runs before anything on the page
    proc = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    m = re.search(r'<pre id="__probe">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"chromium did not render the page: {proc.stderr[-2000:]}"
    import html

    result = json.loads(html.unescape(m.group(1)))
    assert result["errors"] == []
    assert result["images"] >= 4 and result["broken"] == 0  # every inline PNG decoded
    for h in ("Run", "Data", "Test set", "Training curves", "Fairness", "Explanations", "Environment", "Recipe"):
        assert h in result["sections"]
    console_errors = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln and ("ERROR" in ln or "Uncaught" in ln)]
    assert console_errors == []
    assert "net::ERR" not in proc.stderr  # no request left the page


def test_a_gate_with_nothing_to_measure_fails_unless_told_to_warn(audited):
    import yaml

    work, _, _ = audited
    proc = keel(
        "run",
        "fair.yaml",
        "audit.fairness.min_group_size=1000",
        "audit.gates.max_equalized_odds_difference=0.1",
        "audit.explain=null",
        "output.dir=runs/unmeasurable",
        cwd=work,
    )
    assert proc.returncode == 3, proc.stderr
    err = " ".join(proc.stderr.split())
    assert (
        "gate cannot be evaluated: audit.gates.max_equalized_odds_difference: no attribute has two groups with "
        "1000+ examples"
        in err
        and "on_unmeasurable=warn" in err
        and "Traceback" not in proc.stderr
    )
    run_dir = work / "runs/unmeasurable"
    gates = json.loads((run_dir / "audit/gates.json").read_text())
    assert gates["failures"] == [] and len(gates["unmeasurable"]) == 1
    page = (run_dir / "report.html").read_text()
    assert "all gates hold" not in page and "nothing to measure" in page
    assert json.loads((run_dir / "run.json").read_text())["status"] == "gate failed"
    # the recipe says so explicitly: the run goes on, and the report says the gate was not evaluated
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    recipe["audit"]["gates"]["on_unmeasurable"] = "warn"
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    again = keel("audit", str(run_dir), cwd=work)
    assert again.returncode == 0, again.stderr
    assert "gate not evaluated" in again.stderr
    page = (run_dir / "report.html").read_text()
    assert "all gates hold" not in page and "gate not evaluated (warn)" in page


def test_gates_without_a_fairness_audit_are_refused(audited):
    work, _, _ = audited
    proc = keel(
        "validate", "fair.yaml", "audit.fairness=null", "audit.gates.max_equalized_odds_difference=0.1", cwd=work
    )
    assert proc.returncode == 2 and "audit.gates" in proc.stderr and "audit.fairness" in proc.stderr
