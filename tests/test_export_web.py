"""The web and mobile exports: Transformers.js's layout, the page in headless Chromium, Transformers.js in Node and
the .ort files, each checked against Python ONNX Runtime on the same tiny random classifier."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from web_browser import Chromium, StaticServer, chromium, off_origin

from keel.errors import KeelError
from keel.export.web import VENDORED, ort_probabilities, runtime_dir, runtime_files, write_web_folder

LABELS = ["neg", "neu", "pos"]
MAX_LEN = 32
SAME_GRAPH_TOL = 1e-3  # the same graph and feeds in another build of ONNX Runtime (WASM, Node): rounding only

try:
    RUNTIME = runtime_dir() if runtime_files() else None  # read before conftest points keel's cache at a tmp folder
except KeelError:
    RUNTIME = None
NO_RUNTIME = "the web runtime is not fetched (run `make web-runtime` once, with network access)"


def _texts(n: int = 200, seed: int = 0) -> list[str]:
    """Short and long texts (some past MAX_LEN tokens, so both sides truncate), words in and out of the vocabulary."""
    rng = random.Random(seed)
    words = "the car bus trip ride was great awful lovely broken sad happy number road taxi our drive zxq qwv".split()
    words += ["the", "car", "was", "our"] * 3  # most texts have no word of either kind
    texts = [" ".join(rng.choice(words) for _ in range(rng.choice([1, 3, 6, 12, 40]))) for _ in range(n - 2)]
    return [*texts, "x", "Ünïcödé, punctuation!? and CAPS"]


GOOD, BAD = ("great", "lovely", "happy"), ("awful", "broken", "sad")


def _tiny_classifier(steps: int = 60):
    """A 2-layer BERT (hidden 32) given a few dozen steps on texts whose label is a word in them: unlike a random
    one (whose logits barely change from text to text), its labels and probabilities differ by text."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from keel.models.registry import model_dir

    tokenizer = AutoTokenizer.from_pretrained(model_dir("tiny-bert"))
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=len(LABELS),
    )
    texts = _texts(96, seed=3)
    labels = torch.tensor([2 if any(w in t for w in GOOD) else 0 if any(w in t for w in BAD) else 1 for t in texts])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BertForSequenceClassification(config)
        enc = tokenizer(texts, truncation=True, max_length=MAX_LEN, padding=True, return_tensors="pt")
        opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
        for step in range(steps):
            rows = torch.arange(step * 16, step * 16 + 16) % len(texts)
            loss = model(**{k: v[rows] for k, v in enc.items()}, labels=labels[rows]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """(the web folder, Python ONNX Runtime's probabilities for _texts() with the int8 and the fp32 graph)."""
    from transformers import AutoTokenizer

    work = tmp_path_factory.mktemp("web")
    runtime = RUNTIME
    if runtime is None:  # layout checks still run: stand-ins for the vendored files
        runtime = work / "fake-runtime"
        for package in ("@huggingface/transformers", "onnxruntime-web"):
            (runtime / "node_modules" / package).mkdir(parents=True)
            (runtime / "node_modules" / package / "package.json").write_text('{"version": "0.0.0"}')
        for rel in VENDORED.values():
            (runtime / "node_modules" / rel).parent.mkdir(parents=True, exist_ok=True)
            (runtime / "node_modules" / rel).write_text("// stand-in\n")
    model, tokenizer = _tiny_classifier()
    folder = work / "export" / "web"
    write_web_folder(
        model, tokenizer, LABELS, folder, _texts(16, seed=1), max_len=MAX_LEN, title="tiny <b>&", runtime=runtime
    )
    saved = AutoTokenizer.from_pretrained(folder)  # what the folder itself says, as a JavaScript app reads it
    oracle = {  # one text per call: dynamic int8 quantizes each batch's activations with one scale
        dtype: ort_probabilities(folder / "onnx" / name, saved, _texts(), MAX_LEN, batch=1)
        for dtype, name in (("q8", "model_quantized.onnx"), ("fp32", "model.onnx"))
    }
    return folder, oracle


def test_the_folder_is_transformers_js_layout_with_the_labels_and_the_inputs_it_feeds(web):
    from keel.io import verify_manifest
    from keel.runtime.ort import session

    folder, oracle = web
    verify_manifest(folder)
    for name in (
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "onnx/model.onnx",
        "onnx/model_quantized.onnx",
        "index.html",
        "serve.py",
        "keel.json",
        "vendor/transformers.min.js",
        "vendor/ort-wasm-simd-threaded.asyncify.mjs",
        "vendor/ort-wasm-simd-threaded.asyncify.wasm",
    ):
        assert (folder / name).is_file(), name
    assert not list(folder.rglob("*.data")), "Transformers.js loads one file per graph here: no external data"
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(LABELS)}
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == MAX_LEN
    for name in ("model.onnx", "model_quantized.onnx"):
        inputs = [i.name for i in session(folder / "onnx" / name).get_inputs()]
        assert inputs == ["input_ids", "attention_mask", "token_type_ids"]
    assert (folder / "onnx/model_quantized.onnx").stat().st_size < (folder / "onnx/model.onnx").stat().st_size / 2.5
    page = (folder / "index.html").read_text()
    assert "<title>tiny &lt;b&gt;&amp; · keel</title>" in page  # the run's name is text, never markup
    assert "http://" not in page and "https://" not in page  # no asset named by another host
    labels = oracle["q8"].argmax(-1)
    assert len(set(labels.tolist())) >= 2, "the oracle's labels must differ between texts, or label equality is weak"
    assert 0 < _int8_tolerance(oracle) <= 0.1  # int8 moves this model's probabilities by a few hundredths


def _int8_tolerance(oracle: dict) -> float:
    """How far int8 moves the probabilities in Python ONNX Runtime itself: no runtime may drift further from fp32."""
    return float(np.abs(oracle["q8"] - oracle["fp32"]).max()) + SAME_GRAPH_TOL


def test_without_the_runtime_the_export_refuses_in_one_line_naming_make_web_runtime(tmp_path, monkeypatch):
    monkeypatch.setenv("KEEL_WEB_RUNTIME", str(tmp_path / "nothing-here"))
    model, tokenizer = _tiny_classifier(steps=0)
    dest = tmp_path / "export" / "web"
    with pytest.raises(KeelError) as err:
        write_web_folder(model, tokenizer, LABELS, dest, ["a text"], max_len=MAX_LEN, title="t")
    message = str(err.value)
    assert "make web-runtime" in message and "nothing-here" in message and "\n" not in message
    assert not dest.exists() and not list(tmp_path.glob("export/.tmp-*"))  # nothing half-written


def _parity(probs: np.ndarray, oracle: np.ndarray, tol: float, labels: bool = True) -> None:
    assert probs.shape == oracle.shape == (200, len(LABELS))
    wrong = np.flatnonzero(probs.argmax(-1) != oracle.argmax(-1))
    if labels:
        assert wrong.size == 0, f"{wrong.size} labels differ from Python ORT's, e.g. text {_texts()[wrong[0]]!r}"
    assert np.abs(probs - oracle).max() <= tol, np.abs(probs - oracle).max()


@pytest.mark.slow  # a Node process
@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (apt-get install nodejs)")
@pytest.mark.skipif(RUNTIME is None, reason=NO_RUNTIME)
@pytest.mark.parametrize("dtype", ["q8", "fp32"])
def test_transformers_js_in_node_gives_python_ort_labels_and_probabilities(web, dtype):
    folder, oracle = web
    script = Path(__file__).with_name("web_classify.mjs")
    proc = subprocess.run(
        ["node", str(script), str(RUNTIME), str(folder), dtype],
        input=json.dumps(_texts()),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    _parity(np.array(json.loads(proc.stdout)), oracle[dtype], SAME_GRAPH_TOL)
    _parity(np.array(json.loads(proc.stdout)), oracle["fp32"], _int8_tolerance(oracle), labels=False)


@pytest.fixture(scope="module")
def browser(web, tmp_path_factory):
    folder, _ = web
    server = StaticServer(folder)
    page = Chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield server, page
    page.close()
    server.stop()


CLASSIFY_ONE_BY_ONE = """(async (texts) => {
  const out = [];
  for (const t of texts) out.push((await window.keel.classify([t]))[0].map((l) => l.score));
  return out;
})(%s)"""


@pytest.mark.slow  # a static server and headless Chromium
@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (apt-get install chromium)")
@pytest.mark.skipif(RUNTIME is None, reason=NO_RUNTIME)
@pytest.mark.parametrize("dtype,threads", [("q8", 2), ("fp32", 1)])
def test_the_page_classifies_in_chromium_as_python_ort_does_with_no_request_leaving_its_origin(
    browser, web, dtype, threads
):
    _, oracle = web
    server, page = browser
    page.requested.clear()
    page.errors.clear()
    page.open(f"{server.url}?dtype={dtype}&threads={threads}")
    state = page.evaluate("({dtype: keel.dtype, threads: keel.threads, isolated: keel.isolated})")
    assert state == {"dtype": dtype, "threads": threads, "isolated": True}  # serve.py's headers: WASM threads work
    assert page.evaluate("document.getElementById('status').textContent").startswith("ready")
    probs = np.array(page.evaluate(CLASSIFY_ONE_BY_ONE % json.dumps(_texts()), timeout=300))
    _parity(probs, oracle[dtype], SAME_GRAPH_TOL)
    _parity(probs, oracle["fp32"], _int8_tolerance(oracle), labels=False)
    # typed text through the page's own form
    page.evaluate(
        "document.getElementById('text').value = 'the trip was lovely'; document.getElementById('go').click()"
    )
    page.evaluate(
        "new Promise((ok) => { const t = setInterval(() => { if (document.querySelectorAll('#out tr').length)"
        " { clearInterval(t); ok(); } }, 50); })"
    )
    rows = page.evaluate("[...document.querySelectorAll('#out tr td:first-child')].map((td) => td.textContent)")
    assert sorted(rows) == sorted(LABELS)
    assert page.errors == []
    assert off_origin(page.requested, server.url) == [], page.requested
    assert any(u.endswith("/vendor/ort-wasm-simd-threaded.asyncify.wasm") for u in page.requested)
    name = "model_quantized.onnx" if dtype == "q8" else "model.onnx"
    assert any(u.endswith(f"/onnx/{name}") for u in page.requested)


@pytest.mark.slow  # onnxruntime's converter runs in a subprocess
def test_the_mobile_ort_files_load_back_in_onnx_runtime_and_answer_as_the_onnx_graphs(web, tmp_path):
    from transformers import AutoTokenizer

    from keel.export.mobile import MODELS, OPERATORS, convert_to_ort

    folder, oracle = web
    convert_to_ort(folder / "onnx", tmp_path)
    assert {f"{n}.ort" for n in MODELS} <= {p.name for p in tmp_path.iterdir()}
    ops = (tmp_path / OPERATORS).read_text()
    assert "ai.onnx;" in ops and "DynamicQuantizeMatMul" in ops  # the int8 graph's operators are in the config
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for dtype, name in (("q8", "model_quantized"), ("fp32", "model")):
        probs = ort_probabilities(tmp_path / f"{name}.ort", tokenizer, _texts(), MAX_LEN, batch=1)
        _parity(probs, oracle[dtype], 1e-5)
