"""FSDP2 (train.parallel=fsdp) on CPU with gloo: the DDP loss curve, and sharded checkpoints that resume exactly with
as many processes and load on another number of them."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from conftest import OFFLINE, TINY_RECIPE, keel, write_toy_csv
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # torchrun with two processes

# 72 training rows; 36 per process, batch 8 -> 5 steps per epoch (the last micro-batch holds 4)
SETTINGS = ["train.num_threads=1", "train.keep_last_k=100"]


def losses(run_dir):
    """Each step's record, without its wall-clock time."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"split"' not in x]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, cwd) -> subprocess.CompletedProcess:
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "keel", *args]
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def torchrun_nodes(nnodes: int, *args: str, cwd) -> None:
    """The multi-node launch of the README, as ``nnodes`` torchrun agents of one process each on this machine,
    meeting at a c10d rendezvous (what each node of a cluster runs, with node 0's address as the endpoint)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc_per_node", "1"]
    cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "keel-test"]
    cmd += ["--local_addr", "127.0.0.1", "-m", "keel", *args]
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}
    agents = [
        subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(nnodes)
    ]
    errors = [agent.communicate(timeout=600)[1] for agent in agents]
    assert all(agent.returncode == 0 for agent in agents), "\n".join(e[-2000:] for e in errors)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same recipe trained by 2 processes, replicated (ddp, one torchrun) and sharded (fsdp, launched as two
    nodes meeting at a rendezvous), checkpointed every 2 steps."""
    work = tmp_path_factory.mktemp("sharded")
    recipe = work / "tiny.yaml"
    recipe.write_text(TINY_RECIPE.format(data=write_toy_csv(work / "toy.csv"), epochs=2, every=2))
    torchrun(2, "train", str(recipe), "output.dir=runs/ddp", "train.parallel=ddp", *SETTINGS, cwd=work)
    torchrun_nodes(2, "train", str(recipe), "output.dir=runs/fsdp", "train.parallel=fsdp", *SETTINGS, cwd=work)
    return work, recipe


def test_fsdp_gives_the_ddp_loss_curve(runs):
    work, _ = runs
    ddp, fsdp = losses(work / "runs/ddp"), losses(work / "runs/fsdp")
    assert [r["step"] for r in fsdp] == list(range(1, 11)) and [r["samples"] for r in fsdp] == [
        r["samples"] for r in ddp
    ]
    # Same data, initial weights and optimiser; only the grouping of fp32 sums differs (a reduce-scatter instead of
    # an all-reduce, the gradient norm as a sum of per-shard sums): ~1e-7 relative per step, so 1e-5 over 10 steps
    # of AdamW. Training without the gradient reduction moves the curve by more than 1e-3.
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(ddp, fsdp)) <= 1e-5
    a, b = (load_file(str(work / f"runs/{k}/model/model.safetensors")) for k in ("ddp", "fsdp"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # really sharded: one file of weights per process, and no replica check (the shards differ by design)
    ckpt = work / "runs/fsdp/checkpoints/step-00000004"
    assert sorted(p.name for p in (ckpt / "model").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors",
        "shard-00002-model-00001-of-00001.safetensors",
    ]
    assert not (work / "runs/fsdp/replicas.json").exists()


def _reassembled(folder) -> dict:
    """Whole tensors from each process's shard files, put together by the offsets in their headers (an oracle
    independent of torch.distributed.checkpoint's reader)."""
    parts: dict = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            offsets = json.loads(f.metadata()["DCP_SHARDING_INFO"])
            for key in f.keys():
                parts.setdefault(key, []).append((offsets[key]["saved_offsets"], f.get_tensor(key)))
    whole = {}
    for key, chunks in parts.items():
        chunks.sort(key=lambda c: c[0])
        whole[key] = torch.cat([t for _, t in chunks]) if chunks[0][1].ndim else chunks[0][1]
    return whole


def test_a_checkpoint_saved_by_2_processes_loads_whole_in_1(runs):
    from transformers import AutoModelForSequenceClassification

    from keel.recipe import load_recipe
    from keel.train import sharded
    from keel.train.engine import build_optimizer

    work, recipe_path = runs
    run_dir = work / "runs/fsdp"
    recipe = load_recipe(recipe_path, ["train.parallel=fsdp", *SETTINGS])
    best = json.loads((run_dir / "checkpoints/best/info.json").read_text())["step"]  # gathered whole at that step
    ckpt = run_dir / f"checkpoints/step-{best:08d}"
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    torch.nn.init.zeros_(model.classifier.weight)  # so a weight the load skipped shows
    optimizer = build_optimizer(model, recipe)
    loaded = sharded.load_checkpoint(ckpt, model, optimizer, recipe, rank=0, world_size=1)
    assert loaded.state.step == best and loaded.rng is None  # another world size: RNG starts from the seed
    expected = load_file(str(run_dir / "checkpoints/best/model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    saved = _reassembled(ckpt / "optimizer")
    names = {id(p): n for n, p in model.named_parameters()}
    for param, pstate in optimizer.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(pstate[key], saved[f"{names[id(param)]}.{key}"])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(
        json.loads((ckpt / "state.json").read_text())["scheduler"]["_last_lr"][0]
    )


def _copy_until(work, name: str, keep_step: int):
    """A copy of the fsdp run as if it had been killed right after the checkpoint of ``keep_step``."""
    shutil.copytree(work / "runs/fsdp", work / "runs" / name)
    root = work / "runs" / name / "checkpoints"
    for p in root.glob("step-*"):
        if p.name > f"step-{keep_step:08d}":
            shutil.rmtree(p)


def test_sharded_resume_with_as_many_processes_is_exact(runs):
    work, recipe = runs
    _copy_until(work, "same", 6)  # mid-epoch 2
    proc = torchrun(
        2, "train", str(recipe), "output.dir=runs/same", "train.parallel=fsdp", *SETTINGS, "--resume", cwd=work
    )
    assert "resuming from step-00000006" in proc.stderr
    assert losses(work / "runs/same") == losses(work / "runs/fsdp")
    a, b = (load_file(str(work / f"runs/{k}/model/model.safetensors")) for k in ("fsdp", "same"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_resume_on_one_process_continues_the_epoch(runs):
    work, recipe = runs
    _copy_until(work, "one", 4)  # 4 micro-batches of 8 on each of 2 processes: 64 of epoch 1's 72 examples seen
    proc = keel("train", str(recipe), "output.dir=runs/one", "train.parallel=fsdp", *SETTINGS, "--resume", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from step-00000004" in proc.stderr and "checkpoint of 2 processes on 1" in proc.stderr
    got, reference = losses(work / "runs/one"), losses(work / "runs/fsdp")
    assert got[:4] == reference[:4]
    # one process, batch 8: the 8 examples left end epoch 1 (as in the 2-process run), then 9 steps of epoch 2
    assert [(r["step"], r["epoch"], r["samples"]) for r in got[4:6]] == [(5, 1, 72), (6, 2, 80)]
    assert got[-1]["step"] == 14 and got[-1]["samples"] == 144
    assert got[-1]["lr"] == 0.0  # the linear schedule was re-planned to end with the steps this size takes
    assert json.loads((work / "runs/one/checkpoints/step-00000014/state.json").read_text())["world_size"] == 1
    assert (work / "runs/one/model/model.safetensors").is_file()
