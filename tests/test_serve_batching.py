"""The batching engines against oracles: continuous batching == HF generate per prompt; dynamic batching ==
one text at a time, with texts that arrive together sharing a forward pass."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(model, tok, ids: list[int], max_new: int) -> list[int]:
    """Greedy decoding with no cache and no batch: the whole sequence through the model at every step."""
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(max_new):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids) :]


def _collector():
    got, done, lock = {}, {}, threading.Lock()

    def emit(index, kind, payload):
        with lock:
            if kind == "done":
                done[index] = payload
            elif kind == "error":
                done[index] = {"error": payload}

    return got, done, emit


@pytest.mark.parametrize("decode", ["keel", "transformers"])  # serve.decode: keel/serve/decode_step.py or HF's
@pytest.mark.parametrize("min_room", [64, 1], ids=["room to spare", "buffers regrown"])
def test_continuous_batching_matches_generate_with_joins_and_leaves(tiny_lm, min_room, decode, monkeypatch):
    """Prompts of different lengths join a running batch at different steps and leave at different
    lengths; every one must decode exactly what HF generate gives it alone (greedy)."""
    from keel.serve.scheduler import GrowingLayer, Scheduler, Sequence

    monkeypatch.setattr(GrowingLayer, "min_room", min_room)
    model, tok = tiny_lm
    sched = Scheduler(model, tok, max_running=4, decode=decode)
    assert (sched._decode is not None) == (decode == "keel")
    sched.eos = set()  # random weights: run every sequence to its full length
    prompts = [
        "Hello there",
        "A much longer prompt about the sea, the ships and the harbour at night",
        "One",
        "Two words",
        "The quick brown fox jumps over the lazy dog again and again",
        "x y z",
    ]
    lengths = [12, 5, 20, 3, 9, 15]
    _, done, emit = _collector()
    seqs = [
        Sequence(tok(p)["input_ids"], n, temperature=0.0, index=i, emit=emit)
        for i, (p, n) in enumerate(zip(prompts, lengths))
    ]
    sched.start()
    try:
        for i, s in enumerate(seqs):  # staggered arrivals: later ones join a batch that is mid-decode
            sched.submit([s])
            time.sleep(0.02 * (i % 3))
        deadline = time.time() + 60
        while len(done) < len(seqs) and time.time() < deadline:
            time.sleep(0.01)
    finally:
        sched.stop()
    assert len(done) == len(seqs), done
    for s, n in zip(seqs, lengths):
        assert done[s.index] == {"finish_reason": "length", "completion_tokens": n}
        assert s.out_ids == _reference(model, tok, s.prompt_ids, n), f"sequence {s.index} diverged"


def test_growing_layer_appends_in_place_and_adopts_replaced_rows():
    from keel.serve.scheduler import GrowingLayer

    layer = GrowingLayer()
    k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    keys, values = layer.update(k, v)
    storage = keys.data_ptr()
    k1, v1 = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
    keys, values = layer.update(k1, v1)
    assert keys.data_ptr() == storage  # a decode step writes into the same buffer: nothing copied
    torch.testing.assert_close(keys, torch.cat([k, k1], 2), rtol=0, atol=0)
    torch.testing.assert_close(values, torch.cat([v, v1], 2), rtol=0, atol=0)
    layer.keys, layer.values = keys[:1, :, 2:], values[:1, :, 2:]  # a leave and a trim, done from outside
    k2, v2 = torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4)
    keys, values = layer.update(k2, v2)
    torch.testing.assert_close(keys, torch.cat([k[:1, :, 2:], k1[:1], k2], 2), rtol=0, atol=0)
    torch.testing.assert_close(values, torch.cat([v[:1, :, 2:], v1[:1], v2], 2), rtol=0, atol=0)
    assert layer.get_seq_length() == 5


def test_cancelled_sequence_leaves_the_batch(tiny_lm):
    from keel.serve.scheduler import Scheduler, Sequence

    model, tok = tiny_lm
    sched = Scheduler(model, tok, max_running=4)
    sched.eos = set()
    _, done, emit = _collector()
    long = Sequence(tok("cancel me")["input_ids"], 400, temperature=0.0, index=0, emit=emit)
    short = Sequence(tok("keep me")["input_ids"], 30, temperature=0.0, index=1, emit=emit)
    sched.start()
    try:
        sched.submit([long, short])
        while len(long.out_ids) < 5:
            time.sleep(0.005)
        long.cancelled = True
        deadline = time.time() + 30
        while 1 not in done and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert sched.running == 0
    finally:
        sched.stop()
    assert 0 not in done and len(long.out_ids) < 400
    assert short.out_ids == _reference(model, tok, short.prompt_ids, 30)


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(tiny_lm):
    from keel.serve.scheduler import Scheduler, Sequence

    model, tok = tiny_lm
    ids = tok("Once upon a time")["input_ids"]

    def run(extra: int) -> list[int]:
        sched = Scheduler(model, tok, max_running=8)
        sched.eos = set()
        _, done, emit = _collector()
        target = Sequence(ids, 15, temperature=0.9, top_p=0.9, seed=123, index=0, emit=emit)
        others = [
            Sequence(tok(f"other prompt {k}")["input_ids"], 15, temperature=1.0, seed=k, index=k + 1, emit=emit)
            for k in range(extra)
        ]
        sched.start()
        try:
            sched.submit(others + [target])
            while len(done) < extra + 1:
                time.sleep(0.01)
        finally:
            sched.stop()
        return target.out_ids

    alone, crowded = run(0), run(5)
    assert alone == crowded
    assert len(set(alone)) > 1  # it did sample


def test_dynamic_batcher_shares_forward_passes_and_keeps_order():
    from keel.serve.batching import DynamicBatcher
    from keel.serve.errors import ServeError

    calls = []

    def fn(texts):
        calls.append(len(texts))
        time.sleep(0.01)
        return [t.upper() for t in texts]

    async def main():
        b = DynamicBatcher(fn, "classify", max_batch_size=8, max_wait_ms=20, max_queue=64)
        b.start()
        try:
            jobs = [b.submit([f"text {i}", f"more {i}"], timeout_s=10) for i in range(12)]
            results = await asyncio.gather(*jobs)
            full = DynamicBatcher(fn, "classify", max_batch_size=8, max_wait_ms=50, max_queue=1)
            full.start()
            first = asyncio.ensure_future(full.submit(["a"], timeout_s=10))
            await asyncio.sleep(0)
            with pytest.raises(ServeError) as e:
                await full.submit(["b"], timeout_s=10)
            await first
            await full.stop()
            return results, e.value
        finally:
            await b.stop()

    results, err = asyncio.run(main())
    assert results == [[f"TEXT {i}", f"MORE {i}"] for i in range(12)]
    assert sum(calls[:-1]) == 24 and max(calls) == 8 and len(calls) - 1 < 24  # batched, never over the cap
    assert err.status == 429 and err.headers["Retry-After"]


def test_a_batch_that_raises_fails_only_the_request_that_caused_it():
    from keel.serve.batching import DynamicBatcher

    calls = []

    def fn(texts):
        calls.append(list(texts))
        if any("poison" in t for t in texts):
            raise ValueError("cannot encode")
        return [t.upper() for t in texts]

    async def main():
        b = DynamicBatcher(fn, "classify", max_batch_size=16, max_wait_ms=50, max_queue=64)
        b.start()
        try:
            jobs = [
                b.submit([f"text {i}", f"more {i}"] if i != 3 else ["fine", "poison"], timeout_s=10) for i in range(6)
            ]
            return await asyncio.gather(*jobs, return_exceptions=True)
        finally:
            await b.stop()

    results = asyncio.run(main())
    assert isinstance(results[3], ValueError)
    assert [r for i, r in enumerate(results) if i != 3] == [[f"TEXT {i}", f"MORE {i}"] for i in range(6) if i != 3]
    assert len(calls[0]) == 12  # they did share a batch before it was split up


def test_explain_queue_is_bounded_stops_at_the_deadline_and_gives_way():
    from keel.serve.batching import ExplainQueue
    from keel.serve.errors import ServeError

    steps, busy = [], [False]
    done = threading.Event()

    def work(n, checkpoint):
        try:
            for k in range(n):
                checkpoint()
                steps.append(k)
                time.sleep(0.01)
            return n
        finally:
            done.set()

    async def main():
        q = ExplainQueue(work, max_queue=1, yield_to=lambda: busy[0], max_pause_s=30)
        try:
            with pytest.raises(ServeError) as late:
                await q.submit(0.3, 10_000)
            assert done.wait(5)  # the abandoned work stopped at its next checkpoint
            stopped_at = len(steps)
            await asyncio.sleep(0.1)
            assert len(steps) == stopped_at
            steps.clear()
            busy[0] = True  # other traffic is waiting: the work gives way
            long = asyncio.ensure_future(q.submit(60, 30))
            await asyncio.sleep(0.05)
            with pytest.raises(ServeError) as full:  # one waiting or running is the bound here
                await q.submit(5, 1)
            await asyncio.sleep(0.3)
            assert steps == []
            busy[0] = False
            assert await long == 30 and len(steps) == 30
            return late.value, full.value, stopped_at
        finally:
            q.stop()

    late, full, stopped_at = asyncio.run(main())
    assert late.status == 504 and late.code == "timeout" and stopped_at < 10_000
    assert full.status == 429 and full.headers["Retry-After"]


def test_an_unexpected_server_error_logs_its_traceback_but_no_request_text(caplog):
    """Through the real app (lifespan, guard, batcher, error handlers) on an engine that fails on one input."""
    import logging

    from starlette.testclient import TestClient

    from keel.recipe import ServeConfig
    from keel.serve.app import build_app
    from keel.serve.engines import Engine

    class Failing(Engine):
        def embed(self, texts):
            if any("boom" in t for t in texts):
                raise RuntimeError("the encoder broke")
            return [{"embedding": [0.5, 0.25], "tokens": 1} for _ in texts]

    engine = Failing("fake", "encoder", tokenizer=None, max_length=8)
    with caplog.at_level(logging.INFO, logger="keel"):
        with TestClient(build_app(engine, ServeConfig(), []), raise_server_exceptions=False) as client:
            ok = client.post("/v1/embeddings", json={"input": "fine"})
            bad = client.post("/v1/embeddings", json={"input": ["fine", "boom secret-words"]})
    assert ok.status_code == 200 and bad.status_code == 500
    assert bad.json()["error"] == {
        "message": "internal error (RuntimeError)",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
    [record] = [r for r in caplog.records if r.name.startswith("keel") and r.levelno >= logging.ERROR]
    assert record.exc_info and "the encoder broke" in caplog.text and "in embed" in caplog.text  # the traceback
    assert "secret-words" not in caplog.text
