"""Fault script: what is served is what was sealed; one writer per run directory.

    python benchmarks/faults/artifacts.py

On a tiny trained run (tiny random BERT, a toy CSV) and a compressed copy of it (a 1-layer student cut from the
teacher), each attack tampers with a fresh copy of the run directory and runs the real CLI: `keel predict`,
`keel eval`, `keel serve` must each refuse (exit 2, one line). Then two `keel train --resume` at once on one run
(one must be refused, the run left whole), a corrupt latest checkpoint (resume must fall back to the one before),
a run stopped before its first checkpoint (resume must start it afresh) and a lock left by a killed process
(taken over). A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OFFLINE, Row, report  # noqa: E402

RECIPE = """
name: tiny
task: classification
model: {{name: tiny-bert, max_length: 32}}
data:
  path: {data}
  split: {{validation: 0.2, test: 0.2, seed: 0}}
train: {{epochs: 1, batch_size: 8, lr: 3.0e-3, warmup_ratio: 0.0, checkpoint_every: 3, keep_last_k: 3}}
"""
ENV = {**os.environ, **OFFLINE}


def keel(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "keel", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV
    )


def serve(run: Path, *args: str, cwd: Path) -> tuple[int | None, str]:
    """(exit code, output) of `keel serve`; exit code None when it started serving (then it is stopped)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "keel", "serve", str(run), "--port", "0", *args],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "serving " in line and " at http" in line:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            return None, "".join(lines)
    proc.wait()
    return proc.returncode, "".join(lines)


WORK: list[str] = []  # the scratch folder, left out of the messages shown


def last_error(text: str) -> str:
    for work in WORK:
        text = text.replace(work + "/", "")
    found = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("error:")]
    return (found[-1][:110] + "...") if found else ""


def outcome(rc: int | None, text: str) -> tuple[str, bool]:
    if rc is None:
        return "served", False
    if rc == 0:
        return "loaded silently (exit 0)", False
    clean = rc == 2 and "Traceback" not in text
    return f"refused, exit {rc}: {last_error(text)}" if clean else f"exit {rc} with a traceback", clean


def write_toy_csv(path: Path, n: int = 120) -> Path:
    rng = random.Random(0)
    good, bad = (
        ["great", "lovely", "excellent", "wonderful", "happy"],
        ["awful", "terrible", "horrible", "sad", "broken"],
    )
    filler = ["the car", "this ride", "my trip", "the service", "that road", "our drive", "the bus", "a taxi"]
    lines = ["text,label"]
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        lines.append(f"{rng.choice(filler)} was {rng.choice(good if label == 'pos' else bad)} number {i},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def drop_in_adapter(model_dir: Path, scratch: Path) -> None:
    """A real PEFT LoRA adapter for the run's own model, copied into model/ (transformers applies it by itself)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    get_peft_model(model, LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False)).save_pretrained(
        scratch
    )
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(scratch / name, model_dir / name)


def tamper_rows(work: Path, base: Path, compressed: Path) -> list[Row]:
    goal = "refused (exit 2, one line)"
    jobs = []  # (fault, verb, prepare(run), command(run))
    model_files = sorted(p.name for p in (base / "model").iterdir() if p.name != "manifest.json")
    for name in model_files:
        jobs.append(
            (f"flipped byte in model/{name}", "predict", lambda r, n=name: flip_last_byte(r / "model" / n), "predict")
        )
    verbs = ("predict", "eval", "serve")
    for verb in verbs:
        jobs.append(("deleted model/manifest.json", verb, lambda r: (r / "model" / "manifest.json").unlink(), verb))
        jobs.append(
            (
                "PEFT adapter dropped into model/",
                verb,
                lambda r: drop_in_adapter(r / "model", r.parent / f".adapter-{r.name}"),
                verb,
            )
        )
        jobs.append(
            (
                "recipe.yaml edited: max_length 32 -> 8",
                verb,
                lambda r: (r / "recipe.yaml").write_text(
                    (r / "recipe.yaml").read_text().replace("max_length: 32", "max_length: 8")
                ),
                verb,
            )
        )
        jobs.append(
            ("extra unknown file model/notes.txt", verb, lambda r: (r / "model" / "notes.txt").write_text("hi"), verb)
        )
    jobs.append(
        (
            "compressed run: flipped byte in the teacher's weights",
            "serve --backend student-torch",
            lambda r: flip_last_byte(r / "model" / "model.safetensors"),
            "serve-student",
        )
    )
    jobs.append(
        (
            "compressed run: teacher's manifest deleted",
            "serve --backend student-torch",
            lambda r: (r / "model" / "manifest.json").unlink(),
            "serve-student",
        )
    )

    def attack(i: int, job) -> Row:
        fault, verb, prepare, command = job
        source = compressed if command == "serve-student" else base
        run = work / "runs" / f"t{i:02d}"
        shutil.copytree(source, run)
        prepare(run)
        if command == "predict":
            proc = keel("predict", str(run), "the car was great", cwd=work)
            rc, text = proc.returncode, proc.stdout + proc.stderr
        elif command == "eval":
            proc = keel("eval", str(run), cwd=work)
            rc, text = proc.returncode, proc.stdout + proc.stderr
        elif command == "serve":
            rc, text = serve(run, cwd=work)
        else:
            rc, text = serve(run, "--backend", "student-torch", cwd=work)
        observed, ok = outcome(rc, text)
        return Row(f"{fault} / keel {verb}", goal, observed, ok)

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda a: attack(*a), enumerate(jobs)))


def stopped_at(base: Path, dst: Path, step: int) -> Path:
    """A copy of the run as if killed right after its checkpoint at ``step`` (later checkpoints and model gone)."""
    shutil.copytree(base, dst)
    for p in (dst / "checkpoints").glob("step-*"):
        if int(p.name.split("-")[1]) > step:
            shutil.rmtree(p)
    for name in ("model", "best"):
        shutil.rmtree(dst / name, ignore_errors=True)
    shutil.rmtree(dst / "checkpoints" / "best", ignore_errors=True)
    for name in ("train.json", "eval"):
        p = dst / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return dst


def steps_once(run: Path) -> bool:
    if not (run / "metrics.jsonl").is_file():
        return False
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if x and "split" not in x]
    return steps == list(range(1, len(steps) + 1))


def recipe_matches_model(run: Path) -> bool:
    """The run's recipe.yaml is the one its model was trained with (its sha256 header vs model/keel.json)."""
    try:
        header = (run / "recipe.yaml").read_text().splitlines()[0]
        info = json.loads((run / "model" / "keel.json").read_text())
    except (OSError, ValueError, IndexError):
        return False
    return header.endswith(info.get("recipe_sha256", "?"))


def writer_rows(work: Path, base: Path, recipe: Path) -> list[Row]:
    rows = []
    # two `keel train --resume` at once on a run stopped at step 3 (one asks for 3 epochs, one for 4)
    run = stopped_at(base, work / "runs" / "two", 3)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "keel", "train", str(recipe), f"output.dir={run}", f"train.epochs={e}", "--resume"],
            cwd=work,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for e in (3, 4)
    ]
    results = [(p.wait(timeout=600), p.stdout.read()) for p in procs]
    codes = [rc for rc, _ in results]
    refused = [text for rc, text in results if rc == 2 and "in use by another keel process" in text]
    whole = recipe_matches_model(run) and steps_once(run)
    ok = sorted(codes) == [0, 2] and len(refused) == 1 and whole
    rows.append(
        Row(
            "two `keel train --resume` at once on one run directory",
            "one refused naming the holder; recipe, metrics and model from one process",
            f"exit codes {codes}; "
            + (f"refused: {last_error(refused[0])[7:80]}...; " if refused else "neither refused; ")
            + f"run {'whole' if whole else 'mixed (recipe, metrics or model from different processes)'}",
            ok,
        )
    )

    # corrupt latest checkpoint
    run = stopped_at(base, work / "runs" / "corrupt", 6)
    flip_last_byte(run / "checkpoints" / "step-00000006" / "model.safetensors")
    proc = keel("train", str(recipe), f"output.dir={run}", "--resume", cwd=work)
    text = proc.stdout + proc.stderr
    fell_back = (
        proc.returncode == 0 and "skipping checkpoint step-00000006" in text and "resuming from step-00000003" in text
    )
    rows.append(
        Row(
            "corrupt latest checkpoint (flipped byte), then --resume",
            "resumes from the one before, naming the one skipped",
            "fell back to step-00000003, step-00000006 named (checksum mismatch)"
            if fell_back
            else f"exit {proc.returncode}: {last_error(text) or 'no fallback named'}",
            fell_back,
        )
    )

    # stopped before its first checkpoint
    run = stopped_at(base, work / "runs" / "early", 0)
    shutil.rmtree(run / "checkpoints")
    proc = keel("train", str(recipe), f"output.dir={run}", "--resume", cwd=work)
    text = proc.stdout + proc.stderr
    ok = proc.returncode == 0 and "starting it afresh" in text and (run / "model" / "manifest.json").is_file()
    rows.append(
        Row(
            "--resume on a run stopped before its first checkpoint",
            "starts it afresh, saying so in one line",
            "started afresh and finished (exit 0)" if ok else f"exit {proc.returncode}: {last_error(text)}",
            ok,
        )
    )

    # a lock left by a killed process
    run = work / "runs" / "stale"
    shutil.copytree(base, run)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from keel.io import acquire_run_lock; "
            f"acquire_run_lock({str(run)!r}); print('locked', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    locked = holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    if not locked:  # a keel without run locks: there is nothing to take over
        (run / ".keel.lock").write_text(json.dumps({"pid": holder.pid}))
    proc = keel("eval", str(run), cwd=work)
    ok = proc.returncode == 0
    rows.append(
        Row(
            "the writer holding the lock is killed (kill -9)",
            "the next writer takes the lock over",
            "eval ran (exit 0)"
            + (", said the holder is no longer running" if "no longer running" in proc.stdout + proc.stderr else "")
            if ok
            else f"exit {proc.returncode}: {last_error(proc.stdout + proc.stderr)}",
            ok,
        )
    )
    return rows


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="keel-faults-artifacts-"))
    WORK.append(str(work))
    os.environ.setdefault("KEEL_CACHE_DIR", str(work / "cache"))
    ENV["KEEL_CACHE_DIR"] = os.environ["KEEL_CACHE_DIR"]
    t0 = time.time()
    try:
        recipe = work / "tiny.yaml"
        recipe.write_text(RECIPE.format(data=write_toy_csv(work / "toy.csv")))
        for args in (
            ["train", str(recipe), "output.dir=runs/base"],
            ["distill", "runs/compressed", "compress.distill.layers=1", "compress.distill.epochs=0"],
        ):
            if args[0] == "distill":
                shutil.copytree(work / "runs" / "base", work / "runs" / "compressed")
            proc = keel(*args, cwd=work, timeout=600)
            if proc.returncode != 0:
                print(proc.stdout, proc.stderr)
                return 1
        base, compressed = work / "runs" / "base", work / "runs" / "compressed"
        rows = tamper_rows(work, base, compressed) + writer_rows(work, base, recipe)
        report("artifacts", rows)
        print(f"{sum(r.ok for r in rows)} of {len(rows)} rows meet their goal ({time.time() - t0:.0f} s)")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
