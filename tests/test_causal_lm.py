"""The same engine trains a causal LM: next-token loss, perplexity on the test split."""

import json
import math

import pytest
from conftest import keel

pytestmark = pytest.mark.slow  # trains a causal LM through `keel run`

RECIPE = """
name: lm
task: causal-lm
model: {name: tiny-llama, max_length: 32}
data:
  path: lines.jsonl
  split: {validation: 0.2, test: 0.2, seed: 0}
  max_train_samples: 48
train: {epochs: 2, batch_size: 8, lr: 3.0e-3, warmup_ratio: 0.0}
"""


def test_causal_lm_run(tmp_path):
    lines = [{"text": f"To be or not to be, that is question number {i}. The answer is {i % 7}."} for i in range(200)]
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    (tmp_path / "lm.yaml").write_text(RECIPE)
    keel("run", "lm.yaml", cwd=tmp_path, check=True)
    run_dir = tmp_path / "runs" / "lm"
    test = json.loads((run_dir / "eval" / "test.json").read_text())
    assert test["tokens"] > 0 and math.isclose(test["perplexity"], math.exp(test["loss"]), rel_tol=1e-6)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "split" not in r]
    assert len(steps) == 2 * 6  # 48 blocks of 32 tokens, batch 8
    assert steps[-1]["loss"] < steps[0]["loss"]
    vocab = json.loads((run_dir / "model" / "config.json").read_text())["vocab_size"]
    assert test["loss"] < math.log(vocab) - 1  # well below a uniform guess over the vocabulary
    assert "perplexity" in (run_dir / "report.html").read_text()
