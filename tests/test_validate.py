"""`keel validate` refuses what the run would refuse: schema rules, paths relative to the recipe, data content.

Every case goes through the real command (``python -m keel``) in a fresh process.
"""

import json
import subprocess
import sys

import pytest
from conftest import keel, write_toy_csv

pytestmark = pytest.mark.slow  # runs `keel validate` / `keel run` in subprocesses

BASE = "name: v\nmodel: {name: tiny-bert, max_length: 32}\ndata:\n  path: toy.csv\n"


def _refused(proc, *needles) -> str:
    """The one error line of a refused command (exit 2, no traceback), checked to name every needle."""
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "Traceback" not in text
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, text  # one line naming the problem and the fix
    for needle in needles:
        assert needle in text, text
    return lines[0]


@pytest.fixture
def work(tmp_path):
    write_toy_csv(tmp_path / "toy.csv", n=40)
    return tmp_path


# -- schema rules that used to live in runtime code ----------------------------------------------------------------

SCHEMA_CASES = [
    ("compress:\n  distill: {student: tiny-bert, layers: 1}\n", [], "not both"),
    ("compress:\n  prune: {heads: 0, ffn: 0}\n", [], "removes nothing"),
    ("compress:\n  distill: {layers: [0, 0]}\n", [], "distinct teacher layer indices"),
    ("compress:\n  distill: {student: gpt-9}\n", [], "compress.distill.student: 'gpt-9': no such model"),
    (
        "federated: {sites: 2, min_available_clients: 3, min_fit_clients: 2}\n",
        [],
        "min_available_clients=3 is more than sites=2",
    ),
    (
        "federated: {sites: 2, min_available_clients: 2, min_fit_clients: 3}\n",
        [],
        "min_fit_clients=3 is more than sites=2",
    ),
    ("train: {privacy: {target_epsilon: 8}, mixed_precision: bf16}\n", [], "train.mixed_precision=no"),
    ("train: {privacy: {target_epsilon: 8}, grad_accum_steps: 2}\n", [], "train.grad_accum_steps=1"),
    ("train: {privacy: {target_epsilon: 8}}\ncompress: {prune: {ffn: 0.5}}\n", [], "quantization only"),
    ("audit: {explain: {}}\n", ["data.split.test=0"], "audit.explain needs test examples"),
    ("audit: {fairness: {split: validation}}\n", ["data.split.validation=0"], "non-empty validation split"),
    ("audit: {fairness: {positive_label: yes-please}}\n", ["data.labels=[pos,neg]"], "not in data.labels"),
    ("audit: {fairness: {groups: column}}\n", [], "no group column"),
    ("audit: {fairness: {categories: [planets]}}\n", [], "unknown ['planets']"),
    ("audit: {fairness: {baseline_run: runs/old}}\n", [], "baseline_run"),
    ("compress: {quantize: {onnx: true}}\n", ["data.split.validation=0"], "data.split.validation is 0"),
]


@pytest.mark.parametrize("extra, overrides, expected", SCHEMA_CASES)
def test_validate_refuses_what_the_run_would(work, extra, overrides, expected):
    (work / "r.yaml").write_text(BASE + extra)
    assert _refused(keel("validate", "r.yaml", *overrides, cwd=work), expected)


def test_federated_section_on_a_causal_lm_is_refused(tmp_path):
    (tmp_path / "r.yaml").write_text(
        "task: causal-lm\nmodel: {name: tiny-llama}\ndata: {name: shakespeare}\nfederated: {sites: 2}\n"
    )
    assert _refused(keel("validate", "r.yaml", cwd=tmp_path), "keel federate trains classifiers")


def test_compress_section_on_a_causal_lm_is_refused(tmp_path):
    (tmp_path / "r.yaml").write_text(
        "task: causal-lm\nmodel: {name: tiny-llama}\ndata: {name: shakespeare}\ncompress: {distill: {layers: 1}}\n"
    )
    assert _refused(keel("validate", "r.yaml", cwd=tmp_path), "compresses classifiers only", "keel distill RUN_DIR")


def test_serve_options_are_checked_by_the_serve_section_model(tmp_path):
    typo = keel("serve", "tiny-bert", "--set", "serve.max_batch_siz=4", cwd=tmp_path)
    assert _refused(typo, "serve options", "did you mean 'serve.max_batch_size'?")
    low = keel("serve", "tiny-bert", "--set", "serve.max_batch_size=0", cwd=tmp_path)
    assert _refused(low, "serve.max_batch_size")
    from keel.errors import RecipeError
    from keel.recipe import validate_serve

    assert validate_serve({"port": 0}).port == 0
    with pytest.raises(RecipeError, match="serve.port"):
        validate_serve({"port": 70000})


# -- paths: relative to the recipe file, overrides relative to the working directory ------------------------------


def test_relative_paths_are_relative_to_the_recipe_file(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    write_toy_csv(project / "toy.csv", n=40)
    (project / "r.yaml").write_text(BASE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = keel("validate", str(project / "r.yaml"), cwd=elsewhere)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert str(project / "toy.csv") in proc.stdout  # the resolved path is printed
    # an override is relative to where keel runs
    write_toy_csv(elsewhere / "other.csv", n=40)
    proc = keel("validate", str(project / "r.yaml"), "data.path=other.csv", cwd=elsewhere)
    assert proc.returncode == 0 and str(elsewhere / "other.csv") in proc.stdout, proc.stdout + proc.stderr
    missing = keel("validate", str(project / "r.yaml"), "data.path=toy.csv", cwd=elsewhere)
    assert _refused(missing, str(elsewhere / "toy.csv"))


def test_every_path_field_is_made_absolute(tmp_path, monkeypatch):
    from keel.recipe import load_recipe

    (tmp_path / "sub").mkdir()
    model = tmp_path / "sub" / "mymodel"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "sub" / "r.yaml").write_text(
        "model: {name: mymodel}\ndata: {path: d/x.csv}\noutput: {dir: out}\n"
        "compress: {distill: {student: mymodel}}\n"
        "audit: {fairness: {baseline_run: ../runs/base}}\n"
        "federated: {sites: 2, server: {root_certificate: ca.pem, certificate: s.pem, private_key: ~/k.pem}}\n"
    )
    monkeypatch.chdir(tmp_path)
    r = load_recipe("sub/r.yaml")
    sub = tmp_path / "sub"
    assert r.model.name == str(model) and r.compress.distill.student == str(model)
    assert r.data.path == str(sub / "d" / "x.csv") and r.output.dir == str(sub / "out")
    assert r.audit.fairness.baseline_run == str(tmp_path / "runs" / "base")
    assert r.federated.server.root_certificate == str(sub / "ca.pem")
    assert not r.federated.server.private_key.startswith("~")
    assert load_recipe("sub/r.yaml", ["model.name=tiny-bert"]).model.name == "tiny-bert"  # a registry name stays
    assert "d/x.csv" not in r.to_yaml().replace(str(sub / "d" / "x.csv"), "")


def test_the_runs_recipe_yaml_names_absolute_paths(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    write_toy_csv(project / "toy.csv", n=40)
    (project / "r.yaml").write_text(BASE + "train: {epochs: 1, max_steps: 1, batch_size: 8}\n")
    run = tmp_path / "runner"
    run.mkdir()
    keel("train", str(project / "r.yaml"), cwd=run, check=True)
    import yaml

    written = yaml.safe_load((run / "runs" / "v" / "recipe.yaml").read_text())
    assert written["data"]["path"] == str(project / "toy.csv")


# -- data content: fails at validate, and `keel run` leaves no run directory ---------------------------------------


def _bad_data(path, kind):
    if kind == "empty":
        path.write_text("")
    elif kind == "header-only":
        path.write_text("text,label\n")
    elif kind == "one-label":
        path.write_text("text,label\n" + "".join(f"text {i},pos\n" for i in range(20)))
    elif kind == "not-utf8":
        path.write_bytes(b"text,label\na,pos\nb,neg\nna\xefve caf\xe9,pos\n")
    elif kind == "too-many-fields":
        path.write_text("text,label\na,pos\nb,neg,extra\n")


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("empty", "is empty"),
        ("header-only", "has no usable rows"),
        ("one-label", "single label ('pos')"),
        ("not-utf8", "bad.csv line 4: not valid UTF-8"),
        ("too-many-fields", "bad.csv line 3: 3 fields"),
    ],
)
def test_bad_csv_fails_at_validate_and_before_a_run_directory(tmp_path, kind, expected):
    _bad_data(tmp_path / "bad.csv", kind)
    (tmp_path / "r.yaml").write_text(BASE.replace("toy.csv", "bad.csv"))
    assert _refused(keel("validate", "r.yaml", cwd=tmp_path), expected)
    if kind in ("empty", "not-utf8"):  # the run refuses it too, before it makes runs/<name>/
        assert _refused(keel("run", "r.yaml", cwd=tmp_path), expected)
        assert not (tmp_path / "runs").exists()


def test_non_utf8_csv_passes_with_encoding_errors_replace(tmp_path):
    _bad_data(tmp_path / "bad.csv", "not-utf8")
    (tmp_path / "r.yaml").write_text(BASE.replace("toy.csv", "bad.csv"))
    proc = keel("validate", "r.yaml", "data.encoding_errors=replace", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_malformed_jsonl_line_is_named(tmp_path):
    rows = [json.dumps({"text": f"text {i}", "label": "pos" if i % 2 else "neg"}) for i in range(60)]
    rows[57] = '{"text": "unterminated'
    (tmp_path / "bad.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "r.yaml").write_text(BASE.replace("toy.csv", "bad.jsonl"))
    assert _refused(keel("validate", "r.yaml", cwd=tmp_path), "bad.jsonl line 58: not JSON")
    rows[57] = "[1, 2]"
    (tmp_path / "bad.jsonl").write_text("\n".join(rows) + "\n")
    assert _refused(keel("validate", "r.yaml", cwd=tmp_path), "bad.jsonl line 58: a JSON list, not an object")


def test_label_outside_the_declared_set_is_named(work):
    (work / "r.yaml").write_text(BASE + "  labels: [pos]\n")
    assert _refused(keel("validate", "r.yaml", cwd=work), "toy.csv line 3: label 'neg' is not in data.labels")


def test_causal_lm_text_file_content_is_checked(tmp_path):
    (tmp_path / "lm.jsonl").write_bytes(b'{"text": "to be or not to be"}\n{"text": "   "}\n\xff\n')
    (tmp_path / "r.yaml").write_text("task: causal-lm\nmodel: {name: tiny-llama}\ndata: {path: lm.jsonl}\n")
    assert _refused(keel("validate", "r.yaml", cwd=tmp_path), "lm.jsonl line 3: not valid UTF-8")
    (tmp_path / "lm.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')
    assert _refused(keel("validate", "r.yaml", cwd=tmp_path), "has no usable rows")


def test_empty_parquet_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.string())}), tmp_path / "d.parquet"
    )
    (tmp_path / "r.yaml").write_text(BASE.replace("toy.csv", "d.parquet"))
    assert _refused(keel("validate", "r.yaml", cwd=tmp_path), "has no rows")
    pq.write_table(pa.table({"text": ["a", "b"], "label": ["x", "x"]}), tmp_path / "d.parquet")
    assert _refused(keel("validate", "r.yaml", cwd=tmp_path), "single label ('x')")


SFT = "task: causal-lm\nmodel: {name: tiny-llama}\ndata: {path: chats.jsonl}\nsft: {method: full}\n"
ALIGN = "task: causal-lm\nmodel: {name: tiny-llama}\ndata: {path: prefs.jsonl}\nalign: {method: dpo}\n"


def test_chat_and_preference_jsonl_are_read_at_validate(tmp_path):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    lines = [json.dumps(chat)] * 5
    lines[3] = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
    (tmp_path / "chats.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "sft.yaml").write_text(SFT)
    assert _refused(
        keel("validate", "sft.yaml", cwd=tmp_path), "chats.jsonl line 4: messages must end with an assistant"
    )
    pair = {"prompt": "p", "chosen": "c", "rejected": "r"}
    lines = [json.dumps(pair)] * 6
    lines[4] = "{not json"
    (tmp_path / "prefs.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "align.yaml").write_text(ALIGN)
    assert _refused(keel("validate", "align.yaml", cwd=tmp_path), "prefs.jsonl line 5: not JSON")
    (tmp_path / "prefs.jsonl").write_bytes(b'{"prompt": "p", "chosen": "\xe9", "rejected": "r"}\n')
    assert _refused(keel("validate", "align.yaml", cwd=tmp_path), "prefs.jsonl line 1: not valid UTF-8")


def test_validate_of_a_data_file_imports_no_torch(work):
    """Reading the data's content stays off torch, pandas and datasets."""
    (work / "r.yaml").write_text(BASE)
    code = (
        "import sys\nfrom keel.cli import main\nsys.argv = ['keel', 'validate', 'r.yaml']\nmain()\n"
        "print('HEAVY', [m for m in ('torch', 'transformers', 'datasets', 'pandas') if m in sys.modules])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "HEAVY []" in proc.stdout, proc.stdout + proc.stderr
