"""benchmarks/train_vs_trainer.py --quick: both loops run on the same tiny splits and the JSON says so (no timings asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import OFFLINE

pytestmark = pytest.mark.slow  # trains with keel and with HF Trainer

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_vs_trainer.py"


def test_quick_mode_runs_both_loops_and_writes_the_table(tmp_path):
    out = tmp_path / "result.json"
    root = str(SCRIPT.parents[1])
    env = {**os.environ, **OFFLINE, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["quick"] and "model.name=tiny-bert" in doc["overrides"]
    by_tool = {r["tool"]: r for r in doc["rounds"]}
    assert set(by_tool) == {"keel", "trainer"}
    # the same work on both sides: 64 training examples, one epoch of batch 8
    assert by_tool["keel"]["steps"] == by_tool["trainer"]["steps"] == 8
    assert by_tool["keel"]["samples"] == by_tool["trainer"]["samples"] == 64
    assert doc["ratio"] > 0 and "ratio Trainer / keel" in proc.stdout
