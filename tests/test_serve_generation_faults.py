"""One generation request never fails another: numerically safe sampling, failures that end one sequence only
(and are logged), a queue bound checked and counted in one step, a 400 for a request that can never fit,
disconnects that stop the work, context errors that name the field, and tokenization off the event loop.

The scheduler is driven in process on a tiny random Llama; the HTTP behaviour through a real `keel serve`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest
import torch
from serve_helpers import Server

SECRET = "the-secret-prompt-text-77"


pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(model, ids: list[int], max_new: int) -> list[int]:
    """Greedy decoding with no cache and no batch."""
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(max_new):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids) :]


def _run(sched, seqs, timeout=60.0) -> dict:
    """Submit ``seqs`` before the loop starts (so they share one prefill), run until each has ended."""
    done, lock = {}, threading.Lock()

    def emit(index, kind, payload):
        with lock:
            if kind in ("done", "error"):
                done[index] = payload if kind == "done" else {"error": payload}

    for s in seqs:
        s.emit = emit
    sched.submit(seqs)
    sched.start()
    try:
        end = time.time() + timeout
        while len(done) < len(seqs) and time.time() < end:
            time.sleep(0.01)
    finally:
        sched.stop()
    return done


# -- sampling and the scheduler, in process --------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-45, 1e-46, 1e-30, 1e-6])
def test_a_tiny_temperature_samples_greedily(temperature):
    from keel.serve.scheduler import Sequence, sample

    logits = torch.randn(3, 500) * 20
    seqs = [Sequence([1], 4, temperature=temperature, top_p=p, seed=0) for p in (1.0, 0.5, 1e-9)]
    for s in seqs:
        s.generator = torch.Generator().manual_seed(0)
    assert sample(logits, seqs) == logits.argmax(-1).tolist()


def test_a_small_temperature_above_the_greedy_bound_still_samples_finite_probabilities():
    from keel.serve.scheduler import Sequence, sample_row

    logits = torch.tensor([1e4, 1e4 - 1e-3, -1e4, 0.0])  # (V,): logits / 1e-4 would be 1e8: exp of it is inf
    s = Sequence([1], 4, temperature=1e-4, seed=0)
    s.generator = torch.Generator().manual_seed(0)
    picks = {sample_row(logits, s) for _ in range(50)}
    assert picks <= {0, 1} and picks  # only the two near-tied best tokens, and no NaN error


def test_a_failing_sequence_ends_alone_with_its_traceback_logged(tiny_lm, caplog):
    from keel.serve.scheduler import Scheduler, Sequence

    model, tok = tiny_lm
    sched = Scheduler(model, tok, max_running=8)
    sched.eos = set()
    prompts = ["Hello there", "A longer prompt about ships", f"{SECRET} and more", "x y z"]
    seqs = [
        Sequence(tok(p)["input_ids"], 12, temperature=0.0, index=i, request_id=f"cmpl-{i}")
        for i, p in enumerate(prompts)
    ]
    seqs[2].stops = [object()]  # stop-string matching raises TypeError for this sequence alone
    with caplog.at_level(logging.INFO, logger="keel.serve"):
        done = _run(sched, seqs)
    assert done[2] == {"error": "generation failed (TypeError)"}
    for i in (0, 1, 3):
        assert done[i] == {"finish_reason": "length", "completion_tokens": 12}, done
        assert seqs[i].out_ids == _reference(model, seqs[i].prompt_ids, 12)
    failures = [r for r in caplog.records if r.name == "keel.serve.scheduler" and r.exc_info]
    assert failures and "cmpl-2" in failures[0].getMessage()
    assert failures[0].exc_info[0] is TypeError  # the traceback is there
    assert SECRET not in caplog.text


def test_a_prompt_that_cannot_be_prefilled_fails_alone_even_in_a_joint_prefill(tiny_lm, caplog):
    from keel.serve.scheduler import Scheduler, Sequence

    model, tok = tiny_lm
    sched = Scheduler(model, tok, max_running=8)
    sched.eos = set()
    good = [Sequence(tok(p)["input_ids"], 8, temperature=0.0, index=i) for i, p in enumerate(["One two", "Three"])]
    bad = Sequence([1, len(tok) + 1000], 8, temperature=0.0, index=2, request_id="cmpl-bad")  # id past the vocab
    with caplog.at_level(logging.INFO, logger="keel.serve"):
        done = _run(sched, [good[0], bad, good[1]])
    assert done[2] == {"error": "generation failed (IndexError)"}
    for s in good:
        assert done[s.index] == {"finish_reason": "length", "completion_tokens": 8}
        assert s.out_ids == _reference(model, s.prompt_ids, 8)
    assert any(r.exc_info and "cmpl-bad" in r.getMessage() for r in caplog.records)


def test_a_failed_decode_step_is_logged_and_the_scheduler_goes_on(tiny_lm, caplog):
    """A step's forward pass is shared, so its failure (out of memory, say) ends every running sequence:
    each gets an error event, the traceback is logged, and the next request is served as usual."""
    from keel.serve.scheduler import Scheduler, Sequence

    model, tok = tiny_lm
    sched = Scheduler(model, tok, max_running=8)
    sched.eos = set()
    calls, real = [], sched._step

    def flaky(batch):
        calls.append(len(batch))
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")
        return real(batch)

    sched._step = flaky
    first = [Sequence(tok(p)["input_ids"], 10, temperature=0.0, index=i) for i, p in enumerate(["Hi", "There"])]
    with caplog.at_level(logging.INFO, logger="keel.serve"):
        done = _run(sched, first)
    assert done == {0: {"error": "generation failed (RuntimeError)"}, 1: {"error": "generation failed (RuntimeError)"}}
    step_logs = [r for r in caplog.records if r.exc_info and "decode step failed" in r.getMessage()]
    assert len(step_logs) == 1 and step_logs[0].exc_info[0] is RuntimeError
    sched = Scheduler(model, tok, max_running=8)  # a stopped thread cannot restart: the same model, a new loop
    sched.eos = set()
    sched._step = flaky  # its 4th call onwards: no more failures
    later = Sequence(tok("Again")["input_ids"], 6, temperature=0.0)
    assert _run(sched, [later]) == {0: {"finish_reason": "length", "completion_tokens": 6}}
    assert later.out_ids == _reference(model, later.prompt_ids, 6)


def test_cancelled_waiting_sequences_free_their_places_while_the_batch_is_full(tiny_lm):
    from keel.serve.scheduler import Scheduler, Sequence

    model, tok = tiny_lm
    sched = Scheduler(model, tok, max_running=1)
    sched.eos = set()
    running = Sequence(tok("keep going")["input_ids"], 5000, temperature=0.0, emit=lambda *a: None)
    waiting = [Sequence(tok(f"wait {i}")["input_ids"], 4, temperature=0.0, emit=lambda *a: None) for i in range(5)]
    sched.start()
    try:
        sched.submit([running])
        while not running.out_ids:
            time.sleep(0.005)
        sched.submit(waiting)
        time.sleep(0.1)
        assert sched.waiting == 5  # no room: they wait
        for s in waiting:
            s.cancelled = True  # their clients went away
        end = time.time() + 10
        while sched.waiting and time.time() < end:
            time.sleep(0.01)
        assert sched.waiting == 0 and running.finish_reason is None  # freed while the batch is still full
    finally:
        running.cancelled = True
        sched.stop()
    assert not any(s.out_ids for s in waiting)


def test_try_submit_checks_the_room_and_counts_in_one_step(tiny_lm):
    """The bound is checked and the choices counted under the scheduler's lock (the scheduler's thread
    subtracts from the same count): a refused request leaves nothing behind."""
    from keel.serve.scheduler import Scheduler, Sequence

    model, tok = tiny_lm
    sched = Scheduler(model, tok, max_running=4)  # not started: nothing leaves the queue
    assert sched.try_submit([Sequence([1], 1) for _ in range(6)], max_waiting=8)
    assert not sched.try_submit([Sequence([1], 1) for _ in range(3)], max_waiting=8)
    assert sched.try_submit([Sequence([1], 1) for _ in range(2)], max_waiting=8)
    assert sched.waiting == 8 and sched.inbox.qsize() == 8


# -- through a real `keel serve` ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():
    server = Server(
        "tiny-llama", "--set", "serve.num_threads=1", "--set", "serve.max_queue=8", "--set", "serve.max_n=8"
    )
    yield server
    server.stop()


def _stream(url: str, body: dict, out: list, started: threading.Event) -> None:
    finished, error = 0, None
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            started.set()
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]["message"]
            elif event["choices"] and event["choices"][0]["finish_reason"]:
                finished += 1
    out.append(error or finished)


def _wait_idle(server, timeout=30.0) -> None:
    end = time.time() + timeout
    while server.metric("keel_running_sequences") > 0 and time.time() < end:
        time.sleep(0.05)


@pytest.mark.slow
def test_temperature_1e_45_beside_running_streams_fails_nobody(lm):
    from openai import OpenAI

    outcomes, started = [], threading.Event()
    threads = [
        threading.Thread(
            target=_stream,
            args=(
                lm.url,
                {"prompt": f"Story {i}", "max_tokens": 150, "temperature": 0.8, "seed": i},
                outcomes,
                started,
            ),
        )
        for i in range(3)
    ]
    for t in threads:
        t.start()
    assert started.wait(60)
    client = OpenAI(base_url=f"{lm.url}/v1", api_key="none", max_retries=0)
    tiny = client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=6, temperature=1e-45)
    greedy = client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=6, temperature=0)
    for t in threads:
        t.join(120)
    assert outcomes == [1, 1, 1]  # each innocent stream ended with its finish_reason, no error event
    assert tiny.choices[0].text == greedy.choices[0].text and tiny.choices[0].finish_reason == "length"
    _wait_idle(lm)


@pytest.mark.slow
def test_a_request_that_can_never_fit_the_queue_is_a_400_not_a_429(lm):
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=f"{lm.url}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:  # 3 prompts x n=4 = 12 choices; serve.max_queue=8
        client.completions.create(model="tiny-llama", prompt=["a", "b", "c"], n=4, max_tokens=2)
    body = err.value.body
    assert body["param"] == "n" and body["code"] == "too_many_inputs" and "serve.max_queue" in body["message"]
    with pytest.raises(openai.BadRequestError) as err:  # 9 prompts, n=1
        client.completions.create(model="tiny-llama", prompt=["x"] * 9, max_tokens=2)
    assert err.value.body["param"] == "prompt"
    ok = client.completions.create(model="tiny-llama", prompt=["a", "b"], n=4, max_tokens=2)  # 8 fits
    assert len(ok.choices) == 8


@pytest.mark.slow
def test_a_non_streaming_client_that_disconnects_stops_its_sequences(lm):
    _wait_idle(lm)
    before = lm.metric("keel_generated_tokens_total")
    body = json.dumps({"prompt": "Hello", "max_tokens": 500, "n": 8, "temperature": 0}).encode()
    u = urlparse(lm.url)
    sock = socket.create_connection((u.hostname, u.port))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    end = time.time() + 30
    while lm.metric("keel_running_sequences") == 0 and time.time() < end:
        time.sleep(0.01)
    sock.close()  # gone while tokens are still coming (the old check only ran after 0.5 s without one)
    _wait_idle(lm)
    assert lm.metric("keel_running_sequences") == 0
    time.sleep(0.3)
    generated = lm.metric("keel_generated_tokens_total") - before
    assert 0 < generated < 8 * 500 / 2


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": "hello " * 600, "max_tokens": 4}, "prompt"),
        ("/v1/completions", {"prompt": "hello " * 600}, "prompt"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hello " * 600}], "max_tokens": 4},
            "messages",
        ),
        ("/v1/completions", {"prompt": "hello " * 300, "max_tokens": 400}, "max_tokens"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hello " * 300}], "max_completion_tokens": 400},
            "max_completion_tokens",
        ),
    ],
    ids=["prompt alone", "prompt alone, no max_tokens", "messages alone", "max_tokens", "max_completion_tokens"],
)
@pytest.mark.slow
def test_context_length_errors_name_the_field_that_is_too_long(lm, path, body, param):
    r = httpx.post(f"{lm.url}{path}", json=body, timeout=30)
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == param, err


# -- the event loop, in process ----------------------------------------------------------------------------


def test_tokenization_and_chat_templates_run_off_the_event_loop():
    from keel.recipe import ServeConfig
    from keel.serve.app import build_app
    from keel.serve.engines import load_engine

    engine = load_engine("tiny-llama")
    threads = []
    for name in ("prompt_ids", "chat_ids"):
        real = getattr(engine, name)

        def spy(*args, _real=real, **kwargs):
            threads.append(threading.get_ident())
            return _real(*args, **kwargs)

        setattr(engine, name, spy)
    guard = build_app(engine, ServeConfig(num_threads=1), [])
    app = guard.app

    async def main():
        async with app.router.lifespan_context(app):
            threads.clear()  # the warm-up tokenizes once on the loop, before any request
            loop_thread = threading.get_ident()
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://t") as http:
                c = await http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
                chat = await http.post(
                    "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
                )
            return loop_thread, c.status_code, chat.status_code

    loop_thread, *codes = asyncio.run(main())
    assert codes == [200, 200]
    assert len(threads) == 2 and loop_thread not in threads


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", '{"prompt": ["fine", "bad \\ud800"], "max_tokens": 2}', "prompt"),
        ("/v1/completions", '{"prompt": "fine", "stop": "\\udfff", "max_tokens": 2}', "stop"),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "bad \\ud800"}], "max_tokens": 2}',
            "messages",
        ),
    ],
    ids=["prompt", "stop", "chat content"],
)
@pytest.mark.slow
def test_lone_surrogates_in_generation_requests_are_a_400_naming_the_field(lm, path, body, param):
    r = httpx.post(f"{lm.url}{path}", content=body.encode(), headers={"Content-Type": "application/json"}, timeout=30)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"].startswith(param), err
    assert (
        httpx.post(f"{lm.url}/v1/completions", json={"prompt": "fine", "max_tokens": 2}, timeout=30).status_code == 200
    )
