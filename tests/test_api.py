"""The Python API (keel/api.py): the README's examples are docs/examples/*.py, run here on the built-in tiny recipe;
errors are the CLI's, raised; `import keel` stays light."""

import contextlib
import io
import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import keel

pytestmark = pytest.mark.slow  # trains tiny runs through the Python API

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"
ORDER = ["api_run", "api_load", "api_errors"]  # api_load opens the run api_run made


def _readme_python_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return [b.rstrip("\n") for b in re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)]


def test_the_readme_examples_are_the_tested_files():
    files = sorted(p.stem for p in EXAMPLES.glob("*.py"))
    assert files == sorted(ORDER)  # a new example file is added to ORDER, so it runs
    blocks = _readme_python_blocks()
    assert blocks == [(EXAMPLES / f"{name}.py").read_text().rstrip("\n") for name in ORDER]


@pytest.fixture(scope="module")
def examples(tmp_path_factory, keel_cache):
    """Each example run as a script, in order, in one fresh folder: {name: (its globals, what it printed)}."""
    work = tmp_path_factory.mktemp("api")
    done = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        for name in ORDER:
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                done[name] = runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__"), printed.getvalue()
    return work, done


def test_run_example_trains_and_predicts(examples):
    work, done = examples
    scope, printed = done["api_run"]
    run = scope["run"]
    assert run.dir == work / "runs" / "tiny" and (run.dir / "model" / "model.safetensors").is_file()
    assert run.recipe.train.epochs == 1  # the override reached the run: one epoch, not the recipe's two
    assert run.recipe.sha256() == run.info["recipe_sha256"] and run.info["status"] == "finished"
    assert run.metrics == json.loads((run.dir / "eval" / "test.json").read_text())
    assert run.report_path.is_file()
    assert printed.splitlines()[0].startswith(f"{run.dir} {run.metrics['accuracy']}")
    # the same answers as `keel predict --json`, the CLI in its own process
    texts = ["what a lovely ride", "the bus broke down again"]
    proc = keel("predict", "runs/tiny", *texts, "--json", cwd=work, check=True)
    cli = [json.loads(line) for line in proc.stdout.splitlines()]
    ours = run.predict(texts)
    assert [p["label"] for p in ours] == [p["label"] for p in cli]
    for a, b in zip(ours, cli, strict=True):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-6)
    assert run.predict([]) == []


def test_load_example_evaluates_explains_exports(examples):
    work, done = examples
    scope, printed = done["api_load"]
    run = scope["run"]
    first = done["api_run"][0]["run"]
    assert run.dir == first.dir and float(printed.splitlines()[0]) == first.metrics["macro_f1"]
    e = scope["explanation"]
    assert e.tokens[0] == "[CLS]" and len(e.tokens) == len(e.attributions)
    assert e.label == run.predict(["what a lovely ride"])[0]["label"]
    assert (run.dir / "export" / "onnx-int8" / "model.onnx").is_file()
    assert scope["figures"]["onnx-int8"]["logit_cosine_vs_eager"] >= 0.99
    int8 = run.predict(["what a lovely ride"], backend="onnx-int8")[0]["scores"]
    torch_scores = run.predict(["what a lovely ride"])[0]["scores"]
    assert int8 == pytest.approx(torch_scores, abs=0.02)
    # a file, with its own column names
    (work / "labelled.csv").write_text("body,stars\nwhat a lovely ride,positive\nthe bus broke down,negative\n")
    result = run.evaluate(work / "labelled.csv", text_column="body", label_column="stars")
    assert result["n"] == 2 and result["split"] == "labelled"
    assert (run.dir / "eval" / "labelled.json").is_file()


def test_errors_example_prints_the_cli_line(examples):
    work, done = examples
    _, printed = done["api_errors"]
    assert printed.startswith("error: data.path: file '") and f"{work / 'reviews.csv'}' not found" in printed
    proc = keel("run", "tiny", "data.name=null", "data.path=reviews.csv", cwd=work)
    assert proc.returncode == 2 and printed.strip() in proc.stderr


BAD = [
    ("missing data file", "data:\n  path: nowhere.csv\n", {}),
    ("unknown recipe key", "data: {path: toy.csv}\ntrian: {}\n", {}),
    ("unknown model", "data: {path: toy.csv}\n", {"model__name": "gpt-17"}),
]


@pytest.mark.parametrize("case, recipe, overrides", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_the_cli_error(tmp_path, toy_csv, monkeypatch, case, recipe, overrides):
    import keel as api

    (tmp_path / "r.yaml").write_text(recipe)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(api.KeelError) as raised:  # a SystemExit would escape pytest.raises and fail the test
        api.run("r.yaml", **overrides)
    assert not (tmp_path / "runs").exists()  # refused before a run directory is made
    with pytest.raises(api.KeelError) as checked:
        api.validate("r.yaml", **overrides)
    assert str(checked.value) == str(raised.value)
    strings = [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    proc = keel("run", "r.yaml", *strings, cwd=tmp_path)
    assert proc.returncode == raised.value.exit_code == 2
    assert f"error: {raised.value}" in proc.stderr.splitlines()


def test_the_three_override_forms_are_one(tiny_recipe):
    import keel as api
    from keel.recipe import load_recipe

    path = tiny_recipe()
    cli = load_recipe(path, ["train.epochs=1", "data.split.seed=3", "train.lr=1e-4"])
    forms = [
        api.load_recipe(path, train__epochs=1, data__split__seed=3, train__lr=1e-4),
        api.load_recipe(path, {"train.epochs": 1, "data.split.seed": 3, "train.lr": 1e-4}),
        api.load_recipe(path, ["train.epochs=1", "data.split.seed=3"], train__lr=1e-4),
    ]
    assert {r.sha256() for r in forms} == {cli.sha256()}
    # Python values are kept as they are: the string "no" (YAML would read the CLI's output.dir=no as False)
    assert Path(api.load_recipe(path, output__dir="no").output.dir) == Path.cwd() / "no"  # relative: to the cwd
    assert api.load_recipe(path, data__path=path.parent / "toy.csv").data.path == str(path.parent / "toy.csv")
    # a Recipe or a dict of sections, overridden without being changed
    from keel.api import _recipe

    again = _recipe(cli, None, {"train__epochs": 2})
    assert again.train.epochs == 2 and cli.train.epochs == 1
    assert _recipe(cli.model_dump(mode="json"), None, {}).sha256() == cli.sha256()
    with pytest.raises(api.RecipeError, match=r"unknown key 'train.lrr'; did you mean 'train.lr'\?"):
        api.load_recipe(path, train__lrr=1e-4)
    with pytest.raises(api.KeelError, match="wrap it in a list"):
        api.load_recipe(path, "train.epochs=1")


def test_run_misuse_is_a_keel_error(examples, tmp_path):
    import keel as api

    work, _ = examples
    run = api.load(work / "runs" / "tiny")
    with pytest.raises(api.KeelError, match=r"run directory '.*nope' not found; pass the folder `keel run` printed"):
        api.load(tmp_path / "nope")
    with pytest.raises(api.KeelError, match="holds no keel run"):
        api.load(tmp_path)
    with pytest.raises(api.KeelError, match="pass a list of texts"):
        run.predict("what a lovely ride")
    with pytest.raises(api.KeelError, match="steps must be at least 2; got 1"):
        run.explain(["x"], steps=1)
    with pytest.raises(api.KeelError, match="generate works on causal-lm runs"):
        run.generate(["x"])
    with pytest.raises(api.KeelError, match="go with --data FILE"):
        run.evaluate(text_column="body")
    # serve: the options are checked and the bind refused before any model is loaded or port opened
    with pytest.raises(api.RecipeError, match="unknown key 'serve.max_batch'"):
        run.serve(max_batch=4)
    with pytest.raises(api.KeelError, match="refusing to serve on 0.0.0.0 without API keys"):
        run.serve(host="0.0.0.0", port=0)


LM = {
    "name": "lm",
    "task": "causal-lm",
    "model": {"name": "tiny-llama", "max_length": 32},
    "data": {"split": {"validation": 0.2, "test": 0.2, "seed": 0}, "max_train_samples": 16},
    "train": {"epochs": 1, "batch_size": 8, "lr": 3.0e-3, "warmup_ratio": 0.0},
    "pretrain": {"samples": 0},
}


def test_a_causal_lm_run_generates_as_transformers_does(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import keel as api

    lines = [{"text": f"To be or not to be, that is question number {i}. The answer is {i % 7}."} for i in range(80)]
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    monkeypatch.chdir(tmp_path)
    run = api.run(LM, data__path=str(tmp_path / "lines.jsonl"))
    assert run.task == "causal-lm" and "perplexity" in run.metrics
    prompt = "To be or not"
    ours = run.generate([prompt], max_new_tokens=6)
    folder = tmp_path / "runs" / "lm" / "model"  # the oracle: transformers' greedy decoding on the saved model
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]  # (1, T)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id
        )
    assert ours == [tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)]
    with pytest.raises(api.KeelError, match="keel predict works on classification runs"):
        run.predict(["x"])


def test_import_keel_loads_neither_torch_nor_transformers():
    code = (
        "import sys, keel; r = keel.load_recipe('tiny', train__epochs=1); assert r.train.epochs == 1; "
        "assert callable(keel.run) and keel.Run.__name__ == 'Run'; keel.validate(r); "
        "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert proc.stdout.strip() == "[]"
