"""Generation engines other than keel's fp32 one: int8 decoder weights, and the llama.cpp token loop (driven here
by a stand-in for ``llama_cpp.Llama``, so keel's part of it is tested without llama.cpp installed)."""

from __future__ import annotations

import copy
import threading

import pytest

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("backend", ["int8-weight-only", "int8-dynamic", "torchao-weight-only"])
def test_int8_decoder_keeps_the_logits(tiny_lm, one_thread, backend):
    from keel.serve.lm_int8 import quantize_lm

    model, tok = tiny_lm
    ids = torch.tensor([tok("the quick brown fox jumps over the lazy dog")["input_ids"]])
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
        q = quantize_lm(copy.deepcopy(model), backend)
        got = q(input_ids=ids).logits
    plain = [n for n, m in q.named_modules() if type(m) is torch.nn.Linear and type(m.weight.detach()) is torch.Tensor]
    assert plain == []  # every Linear is quantized, the output head included
    assert q.get_input_embeddings().weight.dtype == torch.float32
    assert not torch.equal(got, ref)  # it did quantize
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert cos > 0.99


def test_int8_weight_only_linear_is_its_int8_weights_times_row_scales(one_thread):
    from keel.serve.lm_int8 import Int8WeightOnlyLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80)
    q = Int8WeightOnlyLinear(linear)
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (80, 48) and q.scales.shape == (80,)
    assert int(q.qweight.abs().amax(1).min()) == 127  # each row's largest weight uses the whole int8 range
    x = torch.randn(2, 3, 48)
    dequantized = q.qweight.float() * q.scales.float()[:, None]  # (80, 48)
    oracle = x.bfloat16().float() @ dequantized.T + linear.bias  # (2, 3, 80)
    with torch.inference_mode():
        got = q(x)
    assert got.shape == (2, 3, 80) and got.dtype == torch.float32
    torch.testing.assert_close(got, oracle, atol=0.02, rtol=0.02)  # the kernel's bfloat16 output
    assert (dequantized - linear.weight).abs().max() <= q.scales.float().max() * 0.51  # rounding to the nearest


def test_int4_weight_only_linear_is_its_int4_groups_times_scales_plus_zeros(one_thread):
    from keel.serve.lm_int8 import Int4WeightOnlyLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    q = Int4WeightOnlyLinear(linear)
    # the oracle: each group of 32 input columns rounded to 16 levels between its bfloat16-rounded ends
    w = linear.weight.detach().reshape(96, 2, 32)
    scale = ((w.amax(-1) - w.amin(-1)) / 15).bfloat16().float()  # (96, 2)
    zero = (w.amin(-1) + 8 * scale).bfloat16().float()
    levels = torch.round((w - zero[..., None]) / scale[..., None] + 8).clamp(0, 15)
    dequantized = ((levels - 8) * scale[..., None] + zero[..., None]).reshape(96, 64)
    assert (dequantized - linear.weight).abs().max() <= scale.max() * 0.6  # rounding to the nearest level
    x = torch.randn(2, 3, 64)
    with torch.inference_mode():
        got = q(x)
    assert got.shape == (2, 3, 96) and got.dtype == torch.float32
    torch.testing.assert_close(got, x.bfloat16().float() @ dequantized.T + linear.bias, atol=0.03, rtol=0.02)


def test_int4_backend_puts_the_decoder_in_int4_and_the_head_in_int8(tiny_lm):
    """(Its quality is measured on SmolLM2 by benchmarks/cpu_generation.py: a random tiny model with large weights
    amplifies int4's rounding into different logits.)"""
    from keel.serve.lm_int8 import Int4WeightOnlyLinear, Int8WeightOnlyLinear, quantize_lm

    q = quantize_lm(copy.deepcopy(tiny_lm[0]), "int4-weight-only")
    kinds = {name: type(m) for name, m in q.named_modules() if name.endswith("_proj") or name == "lm_head"}
    assert kinds.pop("lm_head") is Int8WeightOnlyLinear
    assert set(kinds.values()) == {Int4WeightOnlyLinear} and len(kinds) == 7 * q.config.num_hidden_layers
    assert q.get_input_embeddings().weight.dtype == torch.float32


@pytest.mark.parametrize("backend", ["int8-weight-only", "int4-weight-only"])
def test_weight_only_backends_decode_in_continuous_batches_as_alone(tiny_lm, one_thread, backend):
    """Served through keel's scheduler (left padding, joins), the quantized model decodes what it decodes alone."""
    from keel.serve.lm_int8 import quantize_lm
    from keel.serve.scheduler import Scheduler, Sequence

    model, tok = tiny_lm
    q = quantize_lm(copy.deepcopy(model), backend)
    prompts, lengths = ["Hello there", "A longer prompt about the sea and the ships", "One"], [6, 4, 8]
    seqs = [
        Sequence(tok(p)["input_ids"], n, temperature=0.0, index=i) for i, (p, n) in enumerate(zip(prompts, lengths))
    ]
    sched = Scheduler(q, tok, max_running=4)
    sched.eos = set()
    events = _run(sched, seqs)
    assert sum(k == "done" for _, k, _ in events) == len(seqs)
    for s, n in zip(seqs, lengths):
        alone = list(s.prompt_ids)
        with torch.inference_mode():
            for _ in range(n):  # no cache, no batch
                alone.append(int(q(torch.tensor([alone])).logits[0, -1].argmax()))
        assert s.out_ids == alone[len(s.prompt_ids) :], f"sequence {s.index} diverged"


def test_quantize_lm_refuses_an_unknown_backend(tiny_lm):
    from keel.errors import KeelError
    from keel.serve.lm_int8 import quantize_lm

    with pytest.raises(KeelError, match="int8-weight-only"):
        quantize_lm(copy.deepcopy(tiny_lm[0]), "int8-static")


def test_int8_backends_are_refused_by_name(tiny_lm):
    from keel.errors import KeelError
    from keel.serve.engines import _load_lm

    with pytest.raises(KeelError, match="torchao-weight-only, int8-dynamic"):
        _load_lm(None, "x", "cpu", "onnx-int8")


class FakeLlama:
    """``generate`` yields a fixed token stream; records what it was asked."""

    def __init__(self, stream: list[int], eos: int):
        self.stream, self.eos, self.calls, self.seeds = stream, eos, [], []

    def token_eos(self):
        return self.eos

    def set_seed(self, seed):
        self.seeds.append(seed)

    def generate(self, tokens, **kw):
        self.calls.append((list(tokens), kw))
        yield from self.stream


def _run(scheduler, seqs, timeout=30):
    done = threading.Event()
    events = []

    def emit(index, kind, payload):
        events.append((index, kind, payload))
        if kind in ("done", "error") and sum(k in ("done", "error") for _, k, _ in events) == len(seqs):
            done.set()

    for s in seqs:
        s.emit = emit
    scheduler.start()
    try:
        scheduler.submit(seqs)
        assert done.wait(timeout)
    finally:
        scheduler.stop()
    return events


def test_llama_scheduler_keeps_keels_row_logic(tiny_lm):
    from keel.serve.llama_engine import LlamaScheduler
    from keel.serve.scheduler import Sequence

    _, tok = tiny_lm
    words = tok(" one two three four five six", add_special_tokens=False)["input_ids"]
    llm = FakeLlama(words + [tok.eos_token_id] + words, eos=tok.eos_token_id)
    seqs = [
        Sequence([1, 2, 3], max_new=3, temperature=0.0, index=0),  # stops at max_new
        Sequence([4, 5], max_new=50, temperature=0.7, top_p=0.9, seed=7, index=1),  # runs to EOS
        Sequence([6], max_new=50, temperature=0.0, stops=[" four"], index=2),  # a stop string
    ]
    events = _run(LlamaScheduler(llm, tok), seqs)
    text = {i: "".join(p for j, k, p in events if j == i and k == "text") for i in range(3)}
    done = {i: p for i, k, p in events if k == "done"}
    assert text[0] == tok.decode(words[:3]) and done[0] == {"finish_reason": "length", "completion_tokens": 3}
    assert text[1] == tok.decode(words) and done[1]["finish_reason"] == "stop"
    assert text[2] == " one two three" and done[2]["finish_reason"] == "stop"
    # prompts go in as keel tokenized them, one sequence at a time, with each one's sampling settings
    assert [c[0] for c in llm.calls] == [[1, 2, 3], [4, 5], [6]]
    assert llm.calls[0][1]["temp"] == 0.0 and llm.calls[1][1]["temp"] == 0.7 and llm.calls[1][1]["top_p"] == 0.9
    assert llm.seeds[1] == 7


def test_llama_scheduler_fails_one_sequence_alone(tiny_lm):
    from keel.serve.llama_engine import LlamaScheduler
    from keel.serve.scheduler import Sequence

    _, tok = tiny_lm

    class Broken(FakeLlama):
        def generate(self, tokens, **kw):
            if tokens[0] == 9:
                raise RuntimeError("llama_decode returned -1")
            yield from super().generate(tokens, **kw)

    llm = Broken([5, 6, 7], eos=tok.eos_token_id)
    seqs = [Sequence([9], max_new=2, temperature=0.0, index=0), Sequence([1], max_new=2, temperature=0.0, index=1)]
    events = _run(LlamaScheduler(llm, tok), seqs)
    assert (0, "error", "generation failed (RuntimeError)") in events
    assert (1, "done", {"finish_reason": "length", "completion_tokens": 2}) in events
