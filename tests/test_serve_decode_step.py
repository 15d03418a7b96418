"""keel's own decode step (keel/serve/decode_step.py) against transformers' forward, in process and through a real
`keel serve`: same logits on a left-padded batch whose rows sit at different positions, same greedy text for
streams that join and leave the running batch."""

from __future__ import annotations

import copy
import threading
import time

import httpx
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_thread")


def _prefilled(model, prompts: list[list[int]]):
    """The scheduler's own prefill of ``prompts`` (left-padded): its batch, and the first greedy tokens."""
    from keel.serve.scheduler import Batch, new_cache

    T = max(map(len, prompts))
    ids = torch.zeros((len(prompts), T), dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, T - len(p) :], mask[row, T - len(p) :] = torch.tensor(p), 1
    cache = new_cache(model.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        ).logits[:, -1]  # (B, V)
    for layer in cache.layers:  # as the scheduler does: padded rows' keys and values are zeros
        keep = mask.bool()[:, None, :, None]
        layer.keys, layer.values = torch.where(keep, layer.keys, 0.0), torch.where(keep, layer.values, 0.0)
    return Batch(cache, mask, logits.argmax(-1), mask.sum(-1), [None] * len(prompts))


def _steps(batch, forward, n: int, shift: int = 0) -> list[torch.Tensor]:
    """``n`` greedy decode steps of ``batch`` through ``forward(ids, positions, mask, cache)``: each step's logits.

    ``shift`` moves every row's position (a broken bookkeeping, for the negative control)."""
    out = []
    with torch.inference_mode():
        for _ in range(n):
            mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch), 1))], 1)  # (B, L+1)
            logits = forward(batch.next_ids, batch.positions + shift, mask, batch.cache)  # (B, V)
            batch.mask, batch.positions, batch.next_ids = mask, batch.positions + 1, logits.argmax(-1)
            out.append(logits)
    return out


def _transformers(model):
    def forward(ids, positions, mask, cache):
        return model(
            input_ids=ids[:, None], attention_mask=mask, position_ids=positions[:, None], past_key_values=cache
        ).logits[:, -1]

    return forward


PROMPTS = [[5, 9, 2, 44, 17, 3, 8], [11], [7, 7, 30, 1]]


def test_decode_step_gives_transformers_logits_on_a_left_padded_batch(tiny_lm):
    """Rows of 7, 1 and 4 prompt tokens (so 0, 6 and 3 padded columns), 6 steps: the step's logits are the
    model's own. A step that put every row one position further (RoPE and the cache column) differs."""
    from keel.serve.decode_step import LlamaDecodeStep

    model = copy.deepcopy(tiny_lm[0])
    ref = _steps(_prefilled(model, PROMPTS), _transformers(model), 6)
    step = LlamaDecodeStep(model)
    got = _steps(_prefilled(model, PROMPTS), step, 6)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
    shifted = _steps(_prefilled(model, PROMPTS), step, 6, shift=1)
    assert not torch.allclose(shifted[0], ref[0], atol=1e-2)  # the comparison above can fail


def test_fused_weights_are_the_models_own_memory(tiny_lm):
    """The fused QKV and gate-up weights are the only copy: the model's projections become views of them, and its
    forward (the prefill) gives what it gave before."""
    from keel.serve.decode_step import LlamaDecodeStep

    model = copy.deepcopy(tiny_lm[0])
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        step = LlamaDecodeStep(model)
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    attn, qkv = model.model.layers[0].self_attn, step.layers[0][1]
    assert attn.k_proj.weight.untyped_storage().data_ptr() == qkv.weight.untyped_storage().data_ptr()
    assert qkv.weight.shape == (attn.q_proj.out_features + 2 * attn.k_proj.out_features, model.config.hidden_size)


@pytest.mark.parametrize("backend", ["int8-weight-only", "int4-weight-only"])
def test_decode_step_with_quantized_weights_keeps_the_quantized_models_logits(tiny_lm, backend):
    """Fused int8 / int4 projections: the step gives the quantized model's own logits, and the model's forward
    (whose weights are now views of the fused ones) gives what it gave before."""
    from keel.serve.decode_step import LlamaDecodeStep
    from keel.serve.lm_int8 import quantize_lm

    model = quantize_lm(copy.deepcopy(tiny_lm[0]), backend)
    ref = _steps(_prefilled(model, PROMPTS), _transformers(model), 4)
    step = LlamaDecodeStep(model)
    assert all(layer[4].parts is None for layer in step.layers)  # gate-up fused (QKV too for int8; see below)
    again = _steps(_prefilled(model, PROMPTS), _transformers(model), 4)
    got = _steps(_prefilled(model, PROMPTS), step, 4)
    for r, a, g in zip(ref, again, got):  # bfloat16 activations: a last-bit difference can move a rounding
        assert torch.equal(a, r)
        cos = torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), dim=0)
        assert cos > 0.9999


@pytest.mark.parametrize("rows, fused", [([576, 192, 192], True), ([64, 32, 32], False)])
def test_fused_int4_projections_give_each_layers_own_output(rows, fused):
    """int4 weights are packed in blocks of rows: smollm2's QKV shapes fuse, a tiny model's do not (and runs its
    layers one by one); either way the columns are the layers' own, bit for bit."""
    from keel.serve.decode_step import _Fused
    from keel.serve.lm_int8 import Int4WeightOnlyLinear

    torch.manual_seed(0)
    K = rows[0]
    layers = [Int4WeightOnlyLinear(torch.nn.Linear(K, n, bias=False)) for n in rows]
    x = torch.randn(3, K)
    with torch.inference_mode():
        alone = torch.cat([p(x) for p in layers], -1)  # (3, sum(rows))
        f = _Fused(layers)
        assert (f.parts is None) == fused
        assert torch.equal(f(x), alone)
        assert torch.equal(torch.cat([p(x) for p in layers], -1), alone)  # the layers still read their weights


def test_serve_decode_chooses_the_step_and_refuses_a_model_it_cannot_run(tiny_lm):
    from types import SimpleNamespace

    from conftest import tiny_llama

    from keel.errors import KeelError
    from keel.serve.decode_step import LlamaDecodeStep, decode_step_for
    from keel.serve.server import check_decode

    model = copy.deepcopy(tiny_lm[0])
    assert isinstance(decode_step_for(model, "auto"), LlamaDecodeStep)
    assert decode_step_for(model, "transformers") is None
    biased = tiny_llama(64, attention_bias=True)
    assert decode_step_for(biased, "auto") is None  # served by transformers' forward
    with pytest.raises(KeelError, match=r"serve.decode=keel: .*biases\); use serve.decode=auto"):
        decode_step_for(biased, "keel")
    from keel.serve.lm_int8 import quantize_lm

    torchao = quantize_lm(copy.deepcopy(tiny_lm[0]), "torchao-weight-only")  # nn.Linear, quantized tensor weights
    assert decode_step_for(torchao, "auto") is None
    engine = SimpleNamespace(kind="causal-lm", scheduler_factory=None, lm=biased)
    with pytest.raises(KeelError, match="biases"):
        check_decode(engine, SimpleNamespace(decode="keel"))
    engine.scheduler_factory = object()  # --engine llama.cpp
    with pytest.raises(KeelError, match="serve.engine=llama.cpp"):
        check_decode(engine, SimpleNamespace(decode="keel"))
    check_decode(engine, SimpleNamespace(decode="auto"))


def test_recipe_refuses_an_unknown_decode():
    from keel.errors import RecipeError
    from keel.recipe import validate_serve

    assert validate_serve({"decode": "keel"}).decode == "keel"
    with pytest.raises(RecipeError, match="serve.decode"):
        validate_serve({"decode": "compiled"})


def _reference(model, ids: list[int], max_new: int, eos: set[int]) -> list[int]:
    """Greedy decoding with no cache and no batch, up to an end-of-sequence token."""
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(max_new):
            tok = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            if tok in eos:
                break
            seq.append(tok)
    return seq[len(ids) :]


@pytest.mark.slow
def test_served_streams_joining_and_leaving_decode_what_each_decodes_alone(tiny_lm, tmp_path):
    """A real `keel serve` of the tiny random Llama with serve.decode=keel and room for 2 running sequences:
    5 streams of different prompt and completion lengths arrive staggered, so they wait, join a batch that is
    mid-decode and take the rows that others leave. Each one's greedy text is the one the model gives alone."""
    from serve_helpers import Server

    model, tok = tiny_lm
    folder = tmp_path / "tiny-lm"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    prompts = ["Hello there", "A much longer prompt about the sea and the ships at night", "One", "x y", "Two words"]
    lengths = [14, 5, 20, 9, 3]
    eos = {tok.eos_token_id, model.config.eos_token_id} - {None}
    expected = [
        tok.decode(_reference(model, tok(p)["input_ids"], n, eos), skip_special_tokens=True)
        for p, n in zip(prompts, lengths)
    ]
    server = Server(str(folder), "--set", "serve.decode=keel", "--set", "serve.max_running=2")
    got: dict[int, str] = {}
    try:

        def ask(i: int) -> None:
            time.sleep(0.05 * i)
            body = {"model": "tiny-lm", "prompt": prompts[i], "max_tokens": lengths[i], "temperature": 0}
            got[i] = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert "keel's decode step" in server.log
    finally:
        server.stop()
    assert [got.get(i) for i in range(len(prompts))] == expected
