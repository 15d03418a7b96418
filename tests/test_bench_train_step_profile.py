"""benchmarks/train_step_profile.py --quick: both loops take the very same batches, and the JSON says so (no timings
asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import OFFLINE

pytestmark = pytest.mark.slow  # trains with keel and with HF Trainer

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step_profile.py"


def test_quick_mode_gives_both_loops_identical_batches(tmp_path):
    out = tmp_path / "result.json"
    root = str(SCRIPT.parents[1])
    env = {**os.environ, **OFFLINE, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(out)],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["identical_batches"] is True, proc.stdout
    assert {r["tool"] for r in doc["rounds"]} == {"keel", "trainer"}
    assert all(r["steps_timed"] == doc["steps"] - 1 - doc["warmup"] for r in doc["rounds"])
    assert doc["ratio_cpu"] > 0 and "identical batches: yes" in proc.stdout
