"""`keel data curate` and `keel run` with data.curate on a small CSV; `keel validate` refusals of data.curate."""

from __future__ import annotations

import json

import pytest
from conftest import keel, write_toy_csv

pytestmark = pytest.mark.slow  # runs `keel` in subprocesses

RECIPE = """name: cur
model: {name: tiny-bert, max_length: 32}
data:
  path: toy.csv
  split: {validation: 0.2, test: 0.2, seed: 0}
  curate: {label_errors: {features: tfidf, folds: 3}}
train: {epochs: 1, batch_size: 16, lr: 3.0e-3, warmup_ratio: 0.0}
"""


def _refused(proc, needle: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    return lines[0]


@pytest.fixture
def work(tmp_path):
    path = write_toy_csv(tmp_path / "toy.csv", n=80)
    rows = path.read_text().splitlines()
    rows += [
        rows[1],  # an exact copy: the source dedup (data.dedup) drops it before splitting
        rows[2].replace("number", "Number!!"),  # a copy after normalising: exact dedup after the split
        "write to jane.roe@example.com the car was great number 900,pos",
        "$$$ ### %%% !!!,neg",
    ]
    path.write_text("\n".join(rows) + "\n")
    (tmp_path / "r.yaml").write_text(RECIPE)
    return tmp_path


def test_validate_refuses_a_threshold_out_of_range_and_label_errors_without_labels(work):
    line = _refused(keel("validate", "r.yaml", "data.curate.dedup.threshold=1.5", cwd=work), "threshold")
    assert "data.curate.dedup.threshold" in line and "1.5" in line
    line = _refused(
        keel("validate", "r.yaml", "task=causal-lm", "train.metric=loss", "model.name=tiny-llama", cwd=work),
        "data.curate.label_errors",
    )
    assert "remove it" in line


def test_keel_data_curate_then_run_uses_the_curated_rows(work):
    proc = keel("data", "curate", "r.yaml", cwd=work, check=True)
    assert "PII replaced: EMAIL_ADDRESS" in proc.stdout and "quality rules failed" in proc.stdout, proc.stdout
    assert "curated splits and curate.json in" in proc.stdout

    keel("run", "r.yaml", cwd=work, check=True)
    run = work / "runs" / "cur"
    doc = json.loads((run / "splits" / "curate.json").read_text())
    assert [s["step"] for s in doc["steps"]] == ["pii", "quality", "exact", "near", "contamination", "label_errors"]
    assert doc["pii"]["counts"]["EMAIL_ADDRESS"] == 1 and doc["after"]["test"] == doc["before"]["test"]
    import pandas as pd

    texts = pd.concat(pd.read_parquet(run / "splits" / f"{s}.parquet") for s in ("train", "validation", "test"))
    assert not texts["text"].str.contains("jane.roe@example.com").any()
    page = (run / "report.html").read_text()
    assert "Data curation" in page and "label errors (confident learning)" in page
