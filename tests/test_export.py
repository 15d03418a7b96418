"""ONNX export: parity with PyTorch, int8 within tolerance, and ONNX Runtime behind eval/predict."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY_RECIPE, keel, write_toy_csv

pytestmark = pytest.mark.slow  # trains a run and exports it through `keel`


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    work = tmp_path_factory.mktemp("export")
    csv = write_toy_csv(work / "toy.csv", n=160)
    (work / "tiny.yaml").write_text(TINY_RECIPE.format(data=csv, epochs=4, every=0))
    keel("run", "tiny.yaml", cwd=work, check=True)
    run_dir = work / "runs" / "tiny"
    proc = keel("export", str(run_dir), cwd=work, check=True)
    return work, run_dir, proc


def test_export_writes_both_variants(exported):
    _, run_dir, proc = exported
    for variant in ("onnx", "onnx-int8"):
        folder = run_dir / "export" / variant
        assert {"model.onnx", "tokenizer.json", "keel.json", "manifest.json"} <= {p.name for p in folder.iterdir()}
    assert "max |logit diff|" in proc.stdout and "Warning" not in proc.stderr
    fp32 = sum(p.stat().st_size for p in (run_dir / "export/onnx").glob("model.onnx*"))
    int8 = sum(p.stat().st_size for p in (run_dir / "export/onnx-int8").glob("model.onnx*"))
    assert int8 < fp32 / 2.5


def test_onnx_matches_pytorch_on_new_shapes(exported):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from keel.runtime.ort import OnnxClassifier

    _, run_dir, _ = exported
    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    eager = AutoModelForSequenceClassification.from_pretrained(run_dir / "model").eval()
    fp32, int8 = OnnxClassifier(run_dir / "export/onnx"), OnnxClassifier(run_dir / "export/onnx-int8")
    texts = ["a new text of a length not seen in the export " * 2, "ok", "the bus was wonderful", "x y", "z"]
    batch = tok(texts, padding=True, return_tensors="pt")  # batch 5, a longer sequence than the export saw
    with torch.no_grad():
        ref = eager(**batch).logits.numpy()
    got = fp32(**batch).logits.numpy()
    assert np.abs(got - ref).max() <= 1e-4
    q = int8(**batch).logits.numpy()
    assert np.abs(q - ref).max() <= 0.05 * np.abs(ref).max()  # int8 error small next to the logits' scale
    # logit direction kept on texts like the training data (for texts the model is unsure of, the logits sit
    # near zero and their cosine says little)
    batch = tok(
        [
            f"{a} was {w} number {i}"
            for i, (a, w) in enumerate(
                [("my trip", "happy"), ("the road", "sad"), ("a taxi", "lovely"), ("the car", "broken")]
            )
        ],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        ref = eager(**batch).logits.numpy()
    q = int8(**batch).logits.numpy()
    cos = (q * ref).sum(-1) / (np.linalg.norm(q, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.min() >= 0.99


def test_eval_and_predict_through_onnx_runtime(exported):
    work, run_dir, _ = exported
    torch_eval = json.loads(keel("eval", str(run_dir), "--json", cwd=work, check=True).stdout)
    onnx_eval = json.loads(keel("eval", str(run_dir), "--backend", "onnx", "--json", cwd=work, check=True).stdout)
    int8_eval = json.loads(keel("eval", str(run_dir), "--backend", "onnx-int8", "--json", cwd=work, check=True).stdout)
    assert onnx_eval["backend"] == "onnx" and onnx_eval["accuracy"] == torch_eval["accuracy"]
    assert abs(int8_eval["accuracy"] - torch_eval["accuracy"]) <= 0.07
    assert (run_dir / "eval" / "test.onnx-int8.json").is_file()
    proc = keel(
        "predict",
        str(run_dir),
        "the car was great number 5",
        "the bus was awful number 8",
        "--backend",
        "onnx-int8",
        "--json",
        cwd=work,
        check=True,
    )
    assert [json.loads(x)["label"] for x in proc.stdout.splitlines()] == ["pos", "neg"]


def test_corrupt_export_is_refused(exported, tmp_path):
    import shutil

    work, run_dir, _ = exported
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    data = copy / "export" / "onnx" / "model.onnx.data"
    if not data.exists():
        data = copy / "export" / "onnx" / "model.onnx"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    proc = keel("predict", str(copy), "hello", "--backend", "onnx", cwd=work)
    assert proc.returncode == 2 and "checksum mismatch" in proc.stderr


def test_backend_errors(exported, tmp_path, tiny_recipe):
    work, run_dir, _ = exported
    proc = keel("eval", str(run_dir), "--backend", "tensorrt", cwd=work)
    assert proc.returncode == 2 and "--backend must be one of" in proc.stderr
    keel("train", str(tiny_recipe(epochs=1)), "output.dir=runs/plain", cwd=tmp_path, check=True)
    proc = keel("predict", "runs/plain", "hi", "--backend", "onnx", cwd=tmp_path)
    assert proc.returncode == 2 and "keel export" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_measures_every_variant(exported):
    work, run_dir, _ = exported
    proc = keel("bench", str(run_dir), "--n-latency", "5", "--n-eval", "32", cwd=work, check=True)
    result = json.loads((run_dir / "bench.json").read_text())
    rows = {r["variant"]: r for r in result["variants"]}
    assert list(rows) == ["hf-pipeline", "teacher-torch", "teacher-onnx", "teacher-onnx-int8"]
    assert result["baseline"] == "hf-pipeline"
    base = rows["hf-pipeline"]
    assert base["speedup_p50_vs_pipeline"] == 1 and base["smaller_vs_pipeline"] == 1
    for r in rows.values():
        assert r["n"] == 32 and 0 < r["p50_ms_batch1"] <= r["p95_ms_batch1"] and r["throughput_batch32"] > 0
        assert r["peak_rss_mb"] > 50 and r["params"] == base["params"] > 0
    # the same weights in fp32 give the same predictions whatever runs them
    assert rows["teacher-torch"]["accuracy"] == rows["teacher-onnx"]["accuracy"] == base["accuracy"]
    assert rows["teacher-onnx-int8"]["disk_mb"] < rows["teacher-onnx"]["disk_mb"] / 2.5
    assert rows["teacher-onnx-int8"]["smaller_vs_pipeline"] > 2.5
    page = (run_dir / "report.html").read_text()
    assert "Pareto" in page and page.count("data:image/png;base64,") >= 3
    assert "onnx-int8" in proc.stdout


def test_a_measurement_that_fails_is_one_clear_error_and_the_next_one_still_runs(exported):
    from keel.errors import KeelError
    from keel.export import bench as B

    _, run_dir, _ = exported
    with pytest.raises(KeelError, match="measuring teacher-onnx-int4 failed: --backend must be one of"):
        B._measure(run_dir, "teacher-onnx-int4", 2, 8)
    assert B._measure(run_dir, "teacher-onnx", 2, 8)["n"] == 8  # the fork server outlived the failed child


def test_eval_on_a_file_prints_that_files_own_majority_baseline(exported, tmp_path):
    """A file with other class proportions than the training split: its baseline is its own most frequent label."""
    work, run_dir, _ = exported
    for major, minor in (("pos", "neg"), ("neg", "pos")):  # one of the two differs from the training majority
        rows = [f"the ride was {major} number {i},{major}" for i in range(6)] + [
            f"a {minor} trip,{minor}",
            f"x {minor},{minor}",
        ]
        path = tmp_path / f"{major}.csv"
        path.write_text("text,label\n" + "\n".join(rows) + "\n")
        proc = keel("eval", str(run_dir), "--data", str(path), "--json", cwd=work, check=True)
        base = json.loads(proc.stdout)["baseline"]
        assert (base["label"], base["accuracy"]) == (major, 0.75)
    shown = keel("eval", str(run_dir), "--data", str(path), cwd=work, check=True).stdout  # the last file, as printed
    assert f"majority-class baseline (this file's most frequent label, '{major}'): accuracy 0.7500" in shown


def test_bench_scores_every_variant_on_the_same_validation_batches(exported, monkeypatch):
    """The pipeline baseline and keel's variants score the very same batches (in the split's order, then the same
    length-sorted ones), drawn from the validation split: the pick never sees the test split."""
    import keel.runtime.load as E
    from keel.data.prepare import prepare_data
    from keel.export import bench as B

    _, run_dir, _ = exported
    seen: dict[str, list] = {"hf-pipeline": [], "teacher-onnx": []}
    real_pipeline, real_logits = B.hf_pipeline, E.text_logits

    def spy_pipeline(t):
        pipe = real_pipeline(t)

        def run(texts, **kw):
            seen["hf-pipeline"].append(list(texts))
            return pipe(texts, **kw)

        return run

    monkeypatch.setattr(B, "hf_pipeline", spy_pipeline)
    monkeypatch.setattr(
        E, "text_logits", lambda t, texts: seen["teacher-onnx"].append(list(texts)) or real_logits(t, texts)
    )
    import torch

    try:  # measure_variant turns autograd off for the process it measures in (a bench child, normally)
        rows = {v: B.measure_variant(run_dir, v, n_latency=2, n_eval=1000) for v in seen}
    finally:
        torch.set_grad_enabled(True)
    batched = {v: [b for b in calls if len(b) > 1] for v, calls in seen.items()}  # batch-1 calls are the latency timing
    assert batched["hf-pipeline"] == batched["teacher-onnx"]
    t = E.load_trained(run_dir)
    splits = prepare_data(t.recipe, t.tokenizer, run_dir).splits  # the splits frozen at training time
    val, test = list(splits["validation"]["text"]), set(splits["test"]["text"])
    warm = min(B.WARMUP_BATCHES, -(-len(val) // 32))  # untimed batches first, the same for every side
    timed = batched["hf-pipeline"][warm:]
    in_order, by_length = timed[: len(timed) // 2], timed[len(timed) // 2 :]
    assert batched["hf-pipeline"][:warm] == in_order[:warm]
    assert [x for b in in_order for x in b] == val  # batches of 32 in the split's order
    assert sorted(x for b in by_length for x in b) == sorted(val) and not test & set(val)
    assert [len(b) for b in in_order] == [min(32, len(val) - i) for i in range(0, len(val), 32)]
    for r in rows.values():
        assert r["n"] == len(val) and r["throughput_batch32"] > 0 and r["throughput_sorted_batch32"] > 0
    assert rows["hf-pipeline"]["accuracy"] == rows["teacher-onnx"]["accuracy"]


def _web_runtime():
    """The fetched web runtime (read before conftest points keel's cache at a tmp folder), or None."""
    from keel.errors import KeelError
    from keel.export.web import runtime_dir, runtime_files

    try:
        return runtime_dir() if runtime_files() else None
    except KeelError:
        return None


WEB_RUNTIME = _web_runtime()


def test_export_targets_web_and_mobile(exported, tmp_path):
    work, run_dir, _ = exported
    proc = keel("export", str(run_dir), "--target", "tflite", cwd=work)
    assert proc.returncode == 2 and "--target must be one of onnx, web, mobile; got 'tflite'" in proc.stderr
    proc = keel("export", str(run_dir), "--target", "web", cwd=work, env={"KEEL_WEB_RUNTIME": str(tmp_path / "none")})
    assert proc.returncode == 2 and "make web-runtime" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (run_dir / "export" / "web").exists()

    proc = keel("export", str(run_dir), "--target", "mobile", cwd=work, check=True)
    mobile = run_dir / "export" / "mobile"
    assert {"model.ort", "model_quantized.ort", "required_operators.config", "tokenizer.json"} <= {
        p.name for p in mobile.iterdir()
    }
    assert (
        "--include_ops_by_config" in proc.stdout
        and str(run_dir) not in (mobile / "required_operators.config").read_text()
    )
    labels = json.loads((run_dir / "model" / "config.json").read_text())["id2label"]  # {"0": name, ...}
    assert json.loads((mobile / "keel.json").read_text())["labels"] == [labels[str(i)] for i in range(len(labels))]
    if WEB_RUNTIME is None:
        pytest.skip("the web runtime is not fetched (run `make web-runtime` once, with network access)")
    proc = keel(
        "export", str(run_dir), "--target", "web", cwd=work, check=True, env={"KEEL_WEB_RUNTIME": str(WEB_RUNTIME)}
    )
    web = run_dir / "export" / "web"
    assert (web / "onnx" / "model_quantized.onnx").is_file() and (web / "vendor" / "transformers.min.js").is_file()
    assert "serve.py" in proc.stdout
    assert json.loads((web / "config.json").read_text())["id2label"] == labels
    assert "<title>tiny · keel</title>" in (web / "index.html").read_text()  # the page is titled with the run's name
