"""What is served is what was sealed; one writer per run directory.

One tiny run is trained once (module fixture); every test tampers with a copy of it and runs the real CLI
(`keel predict`, `keel eval`, `keel serve`) against it: each must refuse, in one line, exit code 2.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import OFFLINE, TINY_RECIPE, keel, write_toy_csv

pytestmark = pytest.mark.slow  # trains a run and tampers with it through `keel`


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    work = tmp_path_factory.mktemp("integrity")
    csv = write_toy_csv(work / "toy.csv", n=120)
    recipe = work / "tiny.yaml"
    recipe.write_text(TINY_RECIPE.format(data=csv, epochs=1, every=0))
    keel("train", str(recipe), "output.dir=runs/base", cwd=work, check=True)
    return work, recipe


def copy_run(base, name):
    work, _ = base
    dst = work / "runs" / name
    shutil.copytree(work / "runs" / "base", dst)
    return dst


def refused(proc, *needles):
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "Traceback" not in text, text
    for needle in needles:
        assert needle in text, text


def snapshot(run):
    """Every file of a run with its size and mtime (the writer lock aside): a refused verb must change none."""
    return {
        str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in run.rglob("*")
        if p.is_file() and p.name != ".keel.lock"
    }


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_an_untampered_copy_loads(base):
    work, _ = base
    run = copy_run(base, "clean")
    (run / "model" / "MODEL_CARD.md").write_text("# a card\n")  # written after sealing by the audit: never loaded
    proc = keel("predict", str(run), "the car was great", "--json", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["label"] in ("pos", "neg")


def test_a_dropped_in_peft_adapter_is_refused(base):
    """transformers applies model/adapter_config.json + adapter_model.safetensors on its own; keel must not."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    work, _ = base
    run = copy_run(base, "adapter")
    scratch = work / "adapter-src"
    model = AutoModelForSequenceClassification.from_pretrained(run / "model")
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False))
    lora.save_pretrained(scratch)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(scratch / name, run / "model" / name)
    before = snapshot(run)
    refused(
        keel("predict", str(run), "the car was great", cwd=work), "adapter_config.json is not part of the sealed folder"
    )
    refused(keel("serve", str(run), "--port", "0", cwd=work, timeout=120), "is not part of the sealed folder")
    assert snapshot(run) == before  # refused, and nothing removed or rewritten (the adapter stays for a person to see)


def test_an_extra_unknown_file_in_a_sealed_folder_is_refused(base):
    work, _ = base
    run = copy_run(base, "extra")
    (run / "model" / "generation_config.json").write_text("{}")
    before = snapshot(run)
    refused(keel("eval", str(run), cwd=work), "generation_config.json is not part of the sealed folder")
    assert snapshot(run) == before  # no eval/*.json written from the tampered model


def test_an_edited_recipe_is_refused_not_used(base):
    """The run's recipe.yaml sets the inference length; it must be the recipe the model was sealed with."""
    work, _ = base
    run = copy_run(base, "recipe")
    path = run / "recipe.yaml"
    path.write_text(path.read_text().replace("max_length: 32", "max_length: 8"))
    msg = "model.max_length is 8 there and 32 in the recipe sealed"
    refused(keel("predict", str(run), "hello", cwd=work), msg)
    refused(keel("serve", str(run), "--port", "0", cwd=work, timeout=120), msg)
    from keel.errors import CheckpointError
    from keel.runtime.load import load_trained

    with pytest.raises(CheckpointError, match=msg):  # evaluate_run loads through the same function
        load_trained(run)
    path.unlink()
    with pytest.raises(CheckpointError, match="recipe.yaml is missing"):
        load_trained(run)


def test_a_flipped_byte_in_any_model_file_is_refused(base):
    from keel.errors import CheckpointError
    from keel.runtime.load import load_trained

    run = copy_run(base, "flip")
    names = sorted(p.name for p in (run / "model").iterdir() if p.name != "manifest.json")
    assert {"model.safetensors", "config.json", "keel.json", "tokenizer.json"} <= set(names)
    for name in names:
        path = run / "model" / name
        original = path.read_bytes()
        flip_last_byte(path)
        with pytest.raises(CheckpointError, match="checksum mismatch"):
            load_trained(run)
        path.write_bytes(original)
    load_trained(run)  # restored: loads again


@pytest.fixture(scope="module")
def compressed(base):
    """A student cut from the teacher (not trained: seconds), so `keel serve --backend student-torch` has a teacher
    behind /v1/embeddings that is not the model it classifies with."""
    work, _ = base
    run = copy_run(base, "compressed")
    keel("distill", str(run), "compress.distill.layers=1", "compress.distill.epochs=0", cwd=work, check=True)
    return run


def test_serve_checks_the_teacher_behind_embeddings_of_a_compressed_run(base, compressed):
    from keel.errors import CheckpointError
    from keel.serve.engines import load_engine

    work, _ = base
    run = work / "runs" / "served"
    shutil.copytree(compressed, run)
    assert load_engine(str(run), "student-torch").embed(["a text"])[0]["embedding"]  # intact: it serves
    manifest = run / "model" / "manifest.json"
    kept = manifest.read_bytes()
    manifest.unlink()
    with pytest.raises(CheckpointError, match="has no manifest.json"):
        load_engine(str(run), "student-torch")
    manifest.write_bytes(kept)
    flip_last_byte(run / "model" / "model.safetensors")
    try:
        proc = keel("serve", str(run), "--backend", "student-torch", "--port", "0", cwd=work, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("keel serve started on a tampered teacher")
    refused(proc, "checksum mismatch")


# -- one writer per run directory ---------------------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_holder(base):
    from keel.io import run_lock

    work, recipe = base
    run = copy_run(base, "held")
    with run_lock(run):
        proc = keel("eval", str(run), cwd=work)
        refused(proc, f"PID {os.getpid()}", "in use by another keel process")
        refused(keel("train", str(recipe), f"output.dir={run}", "--resume", cwd=work), f"PID {os.getpid()}")
        assert not (run / "eval").exists()
    assert keel("eval", str(run), cwd=work).returncode == 0  # released: the next writer goes ahead
    assert not (run / ".keel.lock").exists()


def test_a_stale_lock_of_a_killed_process_is_taken_over(base):
    work, _ = base
    run = copy_run(base, "stale")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from keel.io import acquire_run_lock; "
            f"acquire_run_lock({str(run)!r}); print('locked', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **OFFLINE},
    )
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert str(holder.pid) in (run / ".keel.lock").read_text()  # its lock file is still there
    proc = keel("eval", str(run), cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "no longer running" in proc.stdout + proc.stderr and str(holder.pid) in proc.stdout + proc.stderr


def test_two_concurrent_resumes_one_is_refused_and_the_run_stays_whole(base):
    """Also the way forward for a run stopped before its first checkpoint: --resume starts it afresh."""
    work, recipe = base
    run = work / "runs" / "two"
    (run / "checkpoints" / ".tmp-step-00000005-x").mkdir(parents=True)  # what a run killed before its first
    for name in ("recipe.yaml", "run.json"):  # complete checkpoint leaves
        shutil.copy(work / "runs" / "base" / name, run / name)
    first = subprocess.Popen(
        [sys.executable, "-m", "keel", "train", str(recipe), f"output.dir={run}", "train.epochs=3", "--resume"],
        cwd=work,
        env={**os.environ, **OFFLINE},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 120
    while not (run / ".keel.lock").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    second = keel("train", str(recipe), f"output.dir={run}", "train.epochs=12", "--resume", cwd=work)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    assert "nothing was checkpointed" in out and "starting it afresh" in out
    refused(second, f"PID {first.pid}", "in use by another keel process")
    assert "epochs: 3" in (run / "recipe.yaml").read_text()
    info = json.loads((run / "model" / "keel.json").read_text())
    assert info["recipe"]["train"]["epochs"] == 3
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "split" not in r] == list(range(1, 3 * 9 + 1))  # one process's steps, once
    assert not (run / ".keel.lock").exists()
