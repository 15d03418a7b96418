"""Data parallelism: the same recipe under torchrun with 2 CPU processes (gloo)."""

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import OFFLINE

pytestmark = pytest.mark.slow  # runs torchrun with two processes


def test_two_processes_keep_identical_replicas(tmp_path, tiny_recipe):
    recipe = tiny_recipe(epochs=2, every=4)
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        "keel",
        "train",
        str(recipe),
        "output.dir=runs/ddp",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "ddp"
    replicas = json.loads((run_dir / "replicas.json").read_text())
    assert replicas["world_size"] == 2 and len(replicas["sha256"]) == 2
    assert replicas["identical"] and replicas["sha256"][0] == replicas["sha256"][1]
    # 72 training rows, 36 per process, batch 8 -> 5 steps per epoch; one record per step (main process only)
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"split"' not in x]
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert steps[-1]["samples"] == 2 * 72  # both processes' samples, both epochs
    ckpt = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    assert {p.name for p in ckpt.iterdir()} >= {"rng-rank0.safetensors", "rng-rank1.safetensors"}
    assert (run_dir / "model" / "model.safetensors").is_file()
