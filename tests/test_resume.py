"""Exact resume: kill -9 at a random step, resume, and the per-step loss curve is bit-identical.

The negative controls show the comparison can fail: a resume that loses the RNG state, or the
position in the epoch's data order, gives a different curve.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import OFFLINE, keel
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.slow  # trains, kills and resumes `keel` runs

EPOCHS, BATCHES = 3, 12  # 96 training rows / batch 8 = 12 steps per epoch


def losses(run_dir):
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "split" not in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from conftest import TINY_RECIPE, write_toy_csv

    work = tmp_path_factory.mktemp("resume")
    csv = write_toy_csv(work / "toy.csv", n=160)
    recipe = work / "tiny.yaml"
    recipe.write_text(TINY_RECIPE.format(data=csv, epochs=EPOCHS, every=1))
    keel("train", str(recipe), "output.dir=runs/reference", "train.keep_last_k=100", cwd=work, check=True)
    curve = losses(work / "runs" / "reference")
    assert len(curve) == EPOCHS * BATCHES
    return work, recipe, curve


def start_and_kill(work, recipe, out_dir, kill_after_step):
    """Start training, wait until ``kill_after_step`` steps are logged, then SIGKILL it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "keel", "train", str(recipe), f"output.dir={out_dir}"],
        cwd=work,
        env={**os.environ, **OFFLINE},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = work / out_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and sum(1 for ln in metrics.read_text().splitlines() if '"loss"' in ln) >= kill_after_step:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "training ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_and_resume_is_bit_identical(reference):
    work, recipe, expected = reference
    kill_at = random.Random().randint(3, EPOCHS * BATCHES - 3)
    start_and_kill(work, recipe, "runs/killed", kill_at)
    ckpts = sorted((work / "runs/killed/checkpoints").glob("step-*"))
    assert ckpts, "no checkpoint before the kill"
    proc = keel("train", str(recipe), "output.dir=runs/killed", "--resume", cwd=work, check=True)
    assert "resuming from step-" in proc.stderr
    got = losses(work / "runs" / "killed")
    assert got == expected, f"killed after step {kill_at}: curves differ"
    # the final models agree too
    a = load_file(str(work / "runs/reference/model/model.safetensors"))
    b = load_file(str(work / "runs/killed/model/model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)


def tamper(ckpt_dir, edit):
    """Change a checkpoint the way a buggy resume would, then re-seal its manifest (so it loads)."""
    from keel.io import write_manifest

    edit(ckpt_dir)
    write_manifest(ckpt_dir)


def resume_from_copy(work, recipe, name, edit):
    import shutil

    shutil.copytree(work / "runs" / "reference", work / "runs" / name)
    root = work / "runs" / name / "checkpoints"
    # resume from a mid-epoch checkpoint: drop every later one
    keep = f"step-{BATCHES + 5:08d}"
    assert (root / keep).is_dir(), "reference kept too few checkpoints"
    for p in root.glob("step-*"):
        if p.name > keep:
            shutil.rmtree(p)
    tamper(root / keep, edit)
    keel("train", str(recipe), f"output.dir=runs/{name}", "--resume", cwd=work, check=True)
    return losses(work / "runs" / name)


def test_untampered_mid_epoch_resume_matches(reference):
    work, recipe, expected = reference
    assert resume_from_copy(work, recipe, "control", lambda d: None) == expected


def test_negative_control_forgetting_rng_state_changes_the_curve(reference):
    work, recipe, expected = reference

    def forget_rng(d):
        import torch

        t = load_file(str(d / "rng-rank0.safetensors"))
        g = torch.Generator().manual_seed(12345)
        t["torch"] = g.get_state()  # dropout masks no longer continue the original stream
        save_file(t, str(d / "rng-rank0.safetensors"))

    got = resume_from_copy(work, recipe, "no-rng", forget_rng)
    assert got[: BATCHES + 5] == expected[: BATCHES + 5]
    assert got != expected


def test_negative_control_forgetting_data_position_changes_the_curve(reference):
    work, recipe, expected = reference

    def forget_position(d):
        doc = json.loads((d / "state.json").read_text())
        doc["state"]["batch_in_epoch"] = 0  # restart the epoch's data order from the top
        (d / "state.json").write_text(json.dumps(doc))

    got = resume_from_copy(work, recipe, "no-position", forget_position)
    assert got != expected


def test_resume_with_another_model_shape_is_refused(reference):
    work, recipe, _ = reference
    import shutil

    shutil.copytree(work / "runs" / "reference", work / "runs" / "shape")
    proc = keel("train", str(recipe), "output.dir=runs/shape", "model.max_length=48", "--resume", cwd=work)
    assert proc.returncode == 2
    assert "model.max_length was 32 in the checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    proc = keel("train", str(recipe), "output.dir=runs/shape", "model.name=tiny-llama", "--resume", cwd=work)
    assert proc.returncode == 2
    assert "model.name was 'tiny-bert' in the checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_a_corrupt_latest_checkpoint_is_skipped_and_resume_falls_back(reference):
    """The newest checkpoint fails its manifest: resume names it, takes the one before, and replays to the same curve."""
    work, recipe, expected = reference
    import shutil

    shutil.copytree(work / "runs" / "reference", work / "runs" / "corrupt")
    run = work / "runs" / "corrupt"
    shutil.rmtree(run / "model")
    *_, before, last = sorted((run / "checkpoints").glob("step-*"))
    opt = last / "optimizer.safetensors"
    data = bytearray(opt.read_bytes())
    data[-1] ^= 0xFF
    opt.write_bytes(bytes(data))
    proc = keel("train", str(recipe), "output.dir=runs/corrupt", "--resume", cwd=work)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert f"skipping checkpoint {last.name}" in text and "checksum mismatch" in text
    assert f"resuming from {before.name}" in text
    assert losses(run) == expected


def test_no_intact_checkpoint_left_is_refused_not_restarted(reference):
    work, recipe, _ = reference
    import shutil

    run = work / "runs" / "allbad"
    shutil.copytree(work / "runs" / "reference", run)
    shutil.rmtree(run / "model")
    for ckpt in (run / "checkpoints").glob("step-*"):
        (ckpt / "manifest.json").write_text("{")
    proc = keel("train", str(recipe), "output.dir=runs/allbad", "--resume", cwd=work)
    assert proc.returncode == 2 and "no intact checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    shutil.rmtree(run / "checkpoints")
    (run / "model").mkdir()
    proc = keel("train", str(recipe), "output.dir=runs/allbad", "--resume", cwd=work)
    assert proc.returncode == 2 and "has a final model but no checkpoint" in proc.stderr


def test_a_finished_run_given_more_epochs_trains_on(tmp_path, tiny_recipe):
    """`keel run --resume` after raising train.epochs trains the extra epoch from the last checkpoint (it used to
    write the 1-epoch model again), records it, and refuses a recipe the checkpoint cannot continue with."""
    recipe, run = str(tiny_recipe(epochs=1, every=1)), tmp_path / "runs" / "grow"
    common = ("output.dir=runs/grow", "train.metric=loss", "train.keep_last_k=100")
    keel("run", recipe, *common, cwd=tmp_path, check=True)
    first = json.loads((run / "train.json").read_text())
    one = first["steps"]
    before = load_file(str(run / "model" / "model.safetensors"))

    proc = keel("run", recipe, *common, "train.epochs=2", "--resume", cwd=tmp_path, check=True)
    summary = json.loads((run / "train.json").read_text())
    assert summary["steps"] == 2 * one and summary["epochs_done"] == 2, proc.stderr
    assert "training on to epoch 2" in proc.stderr
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["train"]["epochs_done"] == 2
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "split" not in r] == list(range(1, 2 * one + 1))
    assert [r["epoch"] for r in records if r.get("split") == "validation"] == [1, 2]
    assert "(2 epochs)" in (run / "model" / "MODEL_CARD.md").read_text()
    after = load_file(str(run / "model" / "model.safetensors"))
    assert any(not (before[k] == after[k]).all() for k in before), "the final model did not change"
    # the first extra step moved the weights: it took the new plan's learning rate, not the finished schedule's 0
    ckpts = run / "checkpoints"
    end, next_step = (load_file(str(ckpts / f"step-{s:08d}" / "model.safetensors")) for s in (one, one + 1))
    assert any(not (end[k] == next_step[k]).all() for k in end), "step after the resume took lr 0"

    # a change the checkpoint cannot continue with: one line naming the field, and the run's record untouched
    kept = {name: (run / name).read_text() for name in ("run.json", "recipe.yaml", "train.json")}
    proc = keel("train", recipe, *common, "train.epochs=3", "train.lr=0.01", "--resume", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot resume: train.lr was 0.003 in the checkpoint and is 0.01 now" in proc.stderr, proc.stderr
    assert {name: (run / name).read_text() for name in kept} == kept
