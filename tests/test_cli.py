"""End-to-end: the real `keel` command on a tiny model and a toy CSV, as a user would run it."""

import json
import subprocess
import sys

import pytest
from conftest import keel

pytestmark = pytest.mark.slow  # runs the real `keel` command


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from conftest import TINY_RECIPE, write_toy_csv

    work = tmp_path_factory.mktemp("run")
    csv = write_toy_csv(work / "toy.csv", n=160)
    csv.write_text(csv.read_text() + ",pos\n")  # a row without text: dropped, and said so on every run
    (work / "tiny.yaml").write_text(TINY_RECIPE.format(data=csv, epochs=4, every=0))
    proc = keel("run", "tiny.yaml", cwd=work, check=True)
    return work, work / "runs" / "tiny", proc


def test_run_writes_the_run_directory(finished_run):
    work, run_dir, proc = finished_run
    for rel in [
        "recipe.yaml",
        "run.json",
        "metrics.jsonl",
        "train.json",
        "report.html",
        "eval/test.json",
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "model/keel.json",
        "model/manifest.json",
        "checkpoints/best/model.safetensors",
    ]:
        assert (run_dir / rel).is_file(), rel
    assert list(run_dir.glob("checkpoints/step-*/manifest.json"))
    assert not list(run_dir.rglob("*.bin")) and not list(run_dir.rglob("*.pt")) and not list(run_dir.rglob("*.pkl"))
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished" and len(run["recipe_sha256"]) == 64
    assert run["recipe_sha256"] in (run_dir / "recipe.yaml").read_text()
    state = json.loads(next(run_dir.glob("checkpoints/step-*/state.json")).read_text())
    assert state["recipe_sha256"] == run["recipe_sha256"]
    assert "majority-class baseline (the training split's most frequent label" in proc.stdout
    assert "keel predict" in proc.stdout
    # one line about the tokenized data per run, though training, the test evaluation and the report all read it
    assert proc.stderr.count("tokenized in") == 1 and "reusing tokenized cache" not in proc.stderr
    assert "dropped 1 rows" in proc.stderr


def test_the_closing_hint_predicts_a_text_from_the_test_split(finished_run):
    import shlex

    import pandas as pd

    _, run_dir, proc = finished_run
    line = next(x for x in proc.stdout.splitlines() if "keel predict" in x)
    args = shlex.split(line)
    assert args[:3] == ["keel", "predict", "runs/tiny"] and len(args) == 4
    assert args[3] in pd.read_parquet(run_dir / "splits" / "test.parquet")["text"].tolist()
    assert "self-driving" not in proc.stdout


def test_the_hint_text_is_one_shell_word_whatever_the_text(tmp_path):
    import shlex

    import pandas as pd

    from keel.cli import _example_text
    from keel.data.load import RawSplits
    from keel.data.splits import freeze

    nasty = 'it\'s "[bold]great[/]" $(rm -rf ~) `id`\nsecond line\x1b[31m and a long tail of words to cut here'
    frame = pd.DataFrame({"text": [nasty], "label": ["pos"]})
    freeze(tmp_path, RawSplits(frame, frame, frame, ["pos"], "x.csv", "0" * 64))
    quoted = _example_text(tmp_path)
    (word,) = shlex.split(quoted)
    assert "\n" not in word and "\x1b" not in word and len(word) <= 60
    assert " ".join(nasty.replace("\x1b", " ").split()).startswith(word)
    assert _example_text(tmp_path / "missing") == "'a text to classify'"


def test_tiny_model_learns_the_toy_task(finished_run):
    _, run_dir, _ = finished_run
    test = json.loads((run_dir / "eval" / "test.json").read_text())
    assert test["n"] == 32
    assert test["accuracy"] > test["baseline"]["accuracy"] + 0.2  # a word gives the label away
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "split" not in r]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    assert sum(r["loss"] for r in steps[-5:]) < sum(r["loss"] for r in steps[:5])
    assert len([r for r in records if r.get("split") == "validation"]) == 4


def test_report_has_plots_and_baseline(finished_run):
    _, run_dir, _ = finished_run
    page = (run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2  # curves + confusion matrix
    assert "majority class" in page and "http" not in page.replace("http-equiv", "")  # self-contained


def test_predict_and_eval(finished_run, tmp_path):
    work, run_dir, _ = finished_run
    proc = keel(
        "predict",
        str(run_dir),
        "the car was great number 5",
        "the bus was awful number 8",
        "--json",
        cwd=work,
        check=True,
    )
    rows = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [r["label"] for r in rows] == ["pos", "neg"]
    assert all(abs(sum(r["scores"].values()) - 1) < 1e-5 for r in rows)
    piped = subprocess.run(
        [sys.executable, "-m", "keel", "predict", str(run_dir), "-", "--json"],
        cwd=work,
        text=True,
        input="the car was great number 5\n\nthe bus was awful number 8\n",
        capture_output=True,
        check=True,
    )
    assert [json.loads(x)["label"] for x in piped.stdout.splitlines()] == ["pos", "neg"]
    other = tmp_path / "more.jsonl"
    other.write_text(
        "\n".join(
            json.dumps({"text": f"my trip was {w} number {i}", "label": lab})
            for i, (w, lab) in enumerate([("lovely", "pos"), ("sad", "neg"), ("happy", "pos"), ("broken", "neg")])
        )
    )
    proc = keel("eval", str(run_dir), "--data", str(other), "--json", cwd=work, check=True)
    result = json.loads(proc.stdout)
    assert result["n"] == 4 and result["accuracy"] >= 0.75
    assert result["baseline"]["of"] == "file" and "tokenized cache" not in proc.stderr
    proc = keel("eval", str(run_dir), "--data", str(other), cwd=work, check=True)
    assert "majority-class baseline (this file's most frequent label" in proc.stdout
    assert (run_dir / "eval" / "more.json").is_file()
    # another file's own column names
    renamed = tmp_path / "renamed.csv"
    renamed.write_text("review,sentiment\nthe taxi was excellent number 3,pos\nthe road was horrible number 4,neg\n")
    proc = keel("eval", str(run_dir), "--data", str(renamed), cwd=work)
    assert proc.returncode == 2 and "pass --text-column" in proc.stderr
    proc = keel(
        "eval",
        str(run_dir),
        "--data",
        str(renamed),
        "--text-column",
        "review",
        "--label-column",
        "sentiment",
        "--json",
        cwd=work,
        check=True,
    )
    assert json.loads(proc.stdout)["n"] == 2


def test_a_second_run_never_overwrites(finished_run):
    work, run_dir, _ = finished_run
    before = (run_dir / "model" / "model.safetensors").read_bytes()
    proc = keel("train", "tiny.yaml", "train.epochs=1", cwd=work, check=True)
    assert (work / "runs" / "tiny-2" / "model").is_dir()
    # a cached re-run still says what was dropped from the source, and names the cache once
    assert "dropped 1 rows" in proc.stderr and proc.stderr.count("reusing tokenized cache") == 1
    assert (run_dir / "model" / "model.safetensors").read_bytes() == before
    assert "tiny-2" in proc.stdout


def test_flipped_byte_in_final_model_is_refused(finished_run, tmp_path):
    import shutil

    work, run_dir, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    weights = copy / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10
    weights.write_bytes(bytes(data))
    proc = keel("predict", str(copy), "hello", cwd=work)
    assert proc.returncode == 2
    assert "checksum mismatch" in proc.stderr and "Traceback" not in proc.stderr


def test_ls_and_help(tmp_path):
    proc = keel("ls", cwd=tmp_path, check=True)
    for name in [
        "minilm-l6",
        "smollm2-135m",
        "tiny-bert",
        "tweets-sentiment",
        "crows-pairs",
        "bbq",
        "shakespeare",
        "quickstart",
    ]:
        assert name in proc.stdout
    for verb in ["run", "validate", "train", "eval", "predict", "ls", "quickstart", "report"]:
        assert keel(verb, "--help", cwd=tmp_path).returncode == 0


BAD = [
    ("missing data file", "data:\n  path: nowhere.csv\n", [], "nowhere.csv' not found"),
    ("unknown column", "data:\n  path: toy.csv\n  columns: {text: body}\n", [], "data.columns.text: column 'body'"),
    ("empty data set", "data:\n  path: empty.csv\n", [], "no usable rows"),
    ("unseen label", "data:\n  path: toy.csv\n  labels: [pos]\n", [], "label 'neg'"),
    ("malformed YAML", "data: [\n", [], "malformed YAML"),
    ("unknown recipe key", "data: {path: toy.csv}\ntrian: {}\n", [], "unknown key 'trian'"),
    ("wrong type", "data: {path: toy.csv}\n", ["train.batch_size=big"], "train.batch_size"),
    ("unknown model", "data: {path: toy.csv}\nmodel: {name: gpt-17}\n", [], "model.name: 'gpt-17'"),
    (
        "fp16 on CPU",
        "data: {path: toy.csv}\nmodel: {name: tiny-bert}\n",
        ["train.mixed_precision=fp16"],
        "fp16 needs a CUDA GPU",
    ),
]

CAUGHT_BEFORE_THE_RUN = {
    "missing data file",
    "unknown column",
    "empty data set",
    "unseen label",
    "malformed YAML",
    "unknown recipe key",
    "wrong type",
    "unknown model",
}


@pytest.mark.parametrize("case, recipe, overrides, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2(tmp_path, toy_csv, case, recipe, overrides, message):
    (tmp_path / "empty.csv").write_text("text,label\n")
    (tmp_path / "r.yaml").write_text(recipe)
    verb = "run" if case == "fp16 on CPU" else "train"
    proc = keel(verb, "r.yaml", *overrides, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1
    if case in CAUGHT_BEFORE_THE_RUN:  # checked before a run directory exists: a retry is not runs/tiny-2
        assert not (tmp_path / "runs").exists()
    # --debug shows the traceback
    if case == "missing data file":
        assert "Traceback" in keel("--debug", verb, "r.yaml", cwd=tmp_path).stderr
        assert "Traceback" in keel(verb, "r.yaml", "--debug", cwd=tmp_path).stderr


def test_resume_without_a_run_is_a_clear_error(tmp_path, tiny_recipe):
    proc = keel("train", str(tiny_recipe()), "--resume", cwd=tmp_path)
    assert proc.returncode == 2 and "nothing to resume" in proc.stderr


def test_a_local_model_folder_works_as_model_name(finished_run):
    work, run_dir, _ = finished_run
    proc = keel(
        "train",
        "tiny.yaml",
        f"model.name={run_dir / 'model'}",
        "train.epochs=1",
        "output.dir=runs/from-folder",
        cwd=work,
        check=True,
    )
    assert (work / "runs/from-folder/model/model.safetensors").is_file(), proc.stderr


def test_a_model_folder_without_safetensors_is_refused(tmp_path, toy_csv):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    (tmp_path / "r.yaml").write_text(f"data: {{path: {toy_csv}}}\nmodel: {{name: {folder}}}\n")
    proc = keel("validate", "r.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "safetensors only" in proc.stderr


def test_resume_continues_the_run_the_recipe_started_last(tmp_path, tiny_recipe):
    """Not the folder with the newest mtime: `keel report` on an older run writes into it."""
    recipe = str(tiny_recipe(epochs=1))
    for _ in range(2):  # runs/tiny, then runs/tiny-2
        keel("train", recipe, "train.max_steps=2", cwd=tmp_path, check=True)
    older, newer = tmp_path / "runs" / "tiny", tmp_path / "runs" / "tiny-2"
    keel("report", str(older), cwd=tmp_path, check=True)
    assert older.stat().st_mtime >= newer.stat().st_mtime  # what the old rule went by
    proc = keel("train", recipe, "train.max_steps=2", "--resume", cwd=tmp_path, check=True)
    assert "tiny-2" in proc.stderr + proc.stdout
    assert json.loads((newer / "run.json").read_text())["resumed"] is True
    assert json.loads((older / "run.json").read_text())["resumed"] is False


def test_sft_lora_without_merge_ends_with_exit_0(tmp_path):
    """sft.merge: false leaves adapter/ and no model/; the run still ends as a success."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus one?"},
                {"role": "assistant", "content": f"It is {i + 1}."},
            ]
        }
        for i in range(20)
    ]
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "sft.yaml").write_text(
        "name: sft\ntask: causal-lm\nmodel: {name: tiny-llama, max_length: 64}\n"
        "data: {path: chats.jsonl, split: {validation: 0.0, test: 0.2, seed: 0}}\n"
        "sft: {method: lora, merge: false, lora: {r: 4, alpha: 8.0}}\ntrain: {epochs: 1, batch_size: 8, lr: 1.0e-2}\n"
    )
    proc = keel("run", "sft.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = tmp_path / "runs" / "sft"
    assert (run / "adapter").is_dir() and not (run / "model").exists()
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert "adapter" in proc.stdout


def test_a_report_section_that_fails_says_so(finished_run, tmp_path):
    """A broken section is shown as broken (its traceback logged), not left out; the rest of the page is built."""
    import shutil

    work, run_dir, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "bench.json").write_text(json.dumps({"variants": [{"variant": "torch"}]}))  # no figures: a KeyError
    shutil.rmtree(
        copy / "splits", ignore_errors=True
    )  # and the data section cannot show its splits (the source is unrecorded)
    (copy / "data_summary.json").unlink(missing_ok=True)
    (copy / "train.json").write_text("{}")
    proc = keel("report", str(copy), cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    page = (copy / "report.html").read_text()
    assert "<h2>Bench</h2><p class='fail'>This section could not be built: KeyError" in page
    assert "<h2>Data</h2><p class='fail'>This section could not be built: DataError" in page
    assert "<h2>Test set</h2>" in page  # the other sections are still there
    assert "the bench section" in proc.stderr and "--debug" in proc.stderr
    assert "Traceback" in keel("report", str(copy), "--debug", cwd=tmp_path).stderr
