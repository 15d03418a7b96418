"""GGUF export: llama.cpp's converter on a tiny random Llama, read back with the `gguf` package; parity through
llama-cpp-python when it is installed (`make llama`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from keel.errors import KeelError
from keel.export import gguf as G
from keel.export import llama_tools

needs_converter = pytest.mark.skipif(
    not llama_tools.has_converter(), reason="llama.cpp's converter is not unpacked (make llama-src)"
)
needs_llama = pytest.mark.skipif(
    not llama_tools.has_llama_cpp(), reason="llama-cpp-python is not installed (make llama)"
)


@pytest.fixture(scope="module")
def scratch_lm(tmp_path_factory):
    """conftest's tiny random Llama with a byte-level BPE tokenizer trained as keel's from-scratch runs train theirs
    (a pre-tokenizer hash llama.cpp does not know), saved as a Hugging Face folder."""
    from conftest import tiny_llama

    from keel.pretrain import train_tokenizer

    texts = [
        f"the {w} number {i} went to the market and came back with {i % 5} apples"
        for i, w in enumerate(["cat", "dog", "bird", "fish", "horse", "cow"] * 20)
    ]
    tok = train_tokenizer(texts, vocab_size=300, min_frequency=1)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    model = tiny_llama(len(tok), max_position_embeddings=128, **ids)
    folder = tmp_path_factory.mktemp("scratch-lm")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok, folder, texts


@pytest.fixture(scope="module")
def f16_gguf(scratch_lm, tmp_path_factory):
    _, _, folder, _ = scratch_lm
    return G.convert(folder, tmp_path_factory.mktemp("gguf") / "model.gguf", "f16")


@needs_converter
def test_f16_export_reads_back_as_the_model(scratch_lm, f16_gguf):
    import gguf

    model, tok, _, _ = scratch_lm
    reader = gguf.GGUFReader(f16_gguf)

    def field(name):
        return reader.fields[name].contents()

    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == 2 and field("llama.embedding_length") == 64
    assert field("llama.attention.head_count_kv") == 2
    assert field("tokenizer.ggml.pre") == "gpt-2"  # keel's byte-level BPE, named by the fallback
    assert len(field("tokenizer.ggml.tokens")) == len(tok)
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 2 * 9  # embeddings, final norm, output head; 9 per block
    state = model.state_dict()
    # tensors llama.cpp stores as they are (q and k are permuted for its RoPE layout): f16 values of the weights
    for gguf_name, hf_name in [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output.weight", "lm_head.weight"),
        ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"),
        ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),
    ]:
        t = tensors[gguf_name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F16
        want = state[hf_name].numpy().astype(np.float16)
        assert np.array_equal(np.asarray(t.data).reshape(want.shape), want), gguf_name
    norm = tensors["blk.0.attn_norm.weight"]
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32


def test_the_gpt2_fallback_is_for_gpt2_style_tokenizers_only(tmp_path):
    from keel.export.gguf_convert import gpt2_pre_tokenizer

    def write(pre):
        (tmp_path / "tokenizer.json").write_text(json.dumps({"pre_tokenizer": pre}))
        return gpt2_pre_tokenizer(tmp_path)

    assert write({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True})
    assert write({"type": "Sequence", "pretokenizers": [{"type": "ByteLevel", "add_prefix_space": False}]})
    assert not write({"type": "ByteLevel", "add_prefix_space": True, "use_regex": True})
    assert not write({"type": "Metaspace", "replacement": "▁"})
    assert not write(None)


def test_without_the_tools_the_error_names_the_make_target(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    with pytest.raises(KeelError, match="make llama"):
        llama_tools.llama_cpp()
    monkeypatch.setenv(llama_tools.SRC_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(KeelError, match="make llama"):
        G.convert(tmp_path, tmp_path / "x.gguf")
    with pytest.raises(KeelError, match="--quant must be one of f16, q8_0, q4_k_m"):
        G.check_quant("q3")


def test_unpack_takes_only_the_converter(tmp_path):
    import io
    import tarfile

    sdist = tmp_path / "llama_cpp_python-0.0.1.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name in [
            "convert_hf_to_gguf.py",
            "conversion/__init__.py",
            "gguf-py/gguf/__init__.py",
            "src/llama.cpp",
            "../../evil.py",
        ]:
            data = b"# x\n"
            info = tarfile.TarInfo(f"llama_cpp_python-0.0.1/vendor/llama.cpp/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dest = llama_tools.unpack(sdist, tmp_path / "tools")
    got = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert got == ["SOURCE", "conversion/__init__.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    assert not (tmp_path / "evil.py").exists()


@needs_converter
@needs_llama
def test_llama_cpp_matches_pytorch_on_the_f16_export(scratch_lm, f16_gguf):
    model, tok, _, texts = scratch_lm
    blocks = [tok(t)["input_ids"] for t in texts[:4]]
    prompts = [b[:6] for b in blocks[:3]]
    figures = G.parity(model, tok, f16_gguf, blocks, prompts, n_ctx=128, n_new=12)
    assert figures["heldout_tokens"] == sum(len(b) - 1 for b in blocks)
    assert abs(figures["perplexity_ratio"] - 1) < 0.01, figures
    assert figures["greedy_exact"] == len(prompts), figures


@needs_converter
@needs_llama
def test_quantized_exports_stay_close(scratch_lm, tmp_path):
    model, tok, folder, texts = scratch_lm
    f32 = G.convert(folder, tmp_path / "f32.gguf", "f32")
    blocks = [tok(t)["input_ids"] for t in texts[:4]]
    q8 = G.quantize(f32, tmp_path / "q8.gguf", "q8_0")
    assert q8.stat().st_size < 0.6 * f32.stat().st_size
    figures = G.parity(model, tok, q8, blocks, [], n_ctx=128)
    assert abs(figures["perplexity_ratio"] - 1) < G.MAX_PPL_RATIO["q8_0"] - 1, figures


LM_RECIPE = """
name: lm
task: causal-lm
model: {name: tiny-llama, max_length: 32}
data:
  path: lines.jsonl
  split: {validation: 0.2, test: 0.2, seed: 0}
  max_train_samples: 32
train: {epochs: 1, batch_size: 8, lr: 3.0e-3, warmup_ratio: 0.0}
"""


@pytest.mark.slow
@needs_converter
@needs_llama
def test_export_and_serve_a_trained_run_through_llama_cpp(tmp_path):
    import httpx
    from conftest import keel
    from serve_helpers import Server

    lines = [{"text": f"To be or not to be, that is question number {i}. The answer is {i % 7}."} for i in range(120)]
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    (tmp_path / "lm.yaml").write_text(LM_RECIPE)
    keel("run", "lm.yaml", cwd=tmp_path, check=True)
    proc = keel("export", "runs/lm", "--target", "gguf", "--quant", "q8_0", cwd=tmp_path, check=True)
    assert "greedy continuations equal" in proc.stdout
    folder = tmp_path / "runs" / "lm" / "export" / "gguf-q8_0"
    meta = json.loads((folder / "keel.json").read_text())
    assert meta["parity"]["heldout"] == "test" and meta["parity"]["perplexity_ratio"] < G.MAX_PPL_RATIO["q8_0"]
    server = Server(str(tmp_path / "runs" / "lm"), "--engine", "llama.cpp", cwd=tmp_path)
    try:
        body = {"model": "lm", "prompt": "To be or not", "max_tokens": 5, "temperature": 0}
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
        too_long = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 100000}, timeout=60)
        assert too_long.status_code == 400  # keel's limits still in front
        assert server.metric("keel_generated_tokens_total") >= 1
    finally:
        server.stop()


@pytest.mark.slow
def test_export_gguf_refuses_a_classifier_run_in_one_line(tmp_path, tiny_recipe):
    from conftest import keel

    keel("run", str(tiny_recipe()), cwd=tmp_path, check=True)
    proc = keel("export", "runs/tiny", "--target", "gguf", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert "is for causal-lm runs" in proc.stdout + proc.stderr
