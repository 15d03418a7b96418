"""`keel serve RUN_DIR` on an exported classification run (ONNX Runtime int8 by default): classify and
embeddings against in-process oracles, the openai client, a 2,000-request load test, schemathesis fuzzing."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from conftest import TINY_RECIPE, write_toy_csv
from serve_helpers import Server

pytestmark = pytest.mark.slow  # starts `keel serve` on a trained run

TEXTS = ["the car was great number 1", "this ride was awful number 2", "my trip was lovely", "a taxi was broken"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A trained and exported tiny classification run (in-process: the same code `keel train` and
    `keel export` run, without two interpreter start-ups)."""
    from keel.export.onnx import export_onnx
    from keel.pipeline import train_run
    from keel.recipe import load_recipe

    work = tmp_path_factory.mktemp("serve-clf")
    csv = write_toy_csv(work / "toy.csv", n=120)
    (work / "tiny.yaml").write_text(TINY_RECIPE.format(data=csv, epochs=1, every=0))
    run = train_run(load_recipe(work / "tiny.yaml", [f"output.dir={work / 'runs' / 'tiny'}", "train.max_steps=3"]))
    export_onnx(run)
    return run


@pytest.fixture(scope="module")
def clf(run_dir):
    server = Server(
        str(run_dir), "--set", "serve.max_wait_ms=10", "--set", "serve.max_queue=1024", "--set", "serve.num_threads=1"
    )
    yield server
    server.stop()


def test_serves_the_int8_export_by_default_and_says_how_to_call_it(clf):
    assert "(classifier, onnx-int8)" in clf.log
    assert "curl -s http://127.0.0.1:" in clf.log and "from openai import OpenAI" in clf.log


def test_classify_matches_keel_predict(clf, run_dir):
    from keel.evaluate import predict

    r = httpx.post(f"{clf.url}/v1/classify", json={"input": TEXTS, "model": "tiny"}, timeout=30)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    expected = predict(run_dir, TEXTS, backend="onnx-int8")
    assert [d["index"] for d in data] == list(range(len(TEXTS)))
    assert [d["label"] for d in data] == [e["label"] for e in expected]
    for d, e in zip(data, expected):
        assert set(d["scores"]) == {"neg", "pos"} and abs(sum(d["scores"].values()) - 1) < 1e-5
        assert d["score"] == pytest.approx(e["score"], abs=1e-5)


def test_classify_explains_the_served_label_on_request(clf, run_dir):
    r = httpx.post(
        f"{clf.url}/v1/classify", json={"input": TEXTS[:2], "explain": True, "explain_steps": 64}, timeout=60
    )
    assert r.status_code == 200, r.text
    from keel.runtime.load import load_trained
    from keel.trust.explain import integrated_gradients

    teacher = load_trained(run_dir, "torch")  # the served variant is ONNX int8: gradients come from its torch weights
    for d in r.json()["data"]:
        e = d["explanation"]
        assert e["model"] == "torch" and len(e["tokens"]) == len(e["attributions"]) and e["tokens"][0] == "[CLS]"
        target = int(teacher.model.config.label2id[d["label"]])
        [oracle] = integrated_gradients(teacher.model, teacher.tokenizer, [TEXTS[d["index"]]], [target], 64)
        assert e["attributions"] == pytest.approx(oracle.attributions, abs=1e-5)
        assert abs(e["delta"]) < 0.01  # completeness: the attributions add up to p(x) - p(baseline)
    plain = httpx.post(f"{clf.url}/v1/classify", json={"input": TEXTS[:1]}, timeout=30).json()["data"][0]
    assert "explanation" not in plain
    too_many = httpx.post(f"{clf.url}/v1/classify", json={"input": ["a"] * 17, "explain": True}, timeout=30)
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "input"


def test_embeddings_with_the_openai_client_are_mean_pooled_encoder_states(clf, run_dir):
    import torch
    from openai import OpenAI
    from transformers import AutoModel, AutoTokenizer

    client = OpenAI(base_url=f"{clf.url}/v1", api_key="unused", max_retries=0)
    res = client.embeddings.create(model="tiny", input=TEXTS[:2])
    got = np.array([d.embedding for d in res.data])  # (2, E)
    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    enc = AutoModel.from_pretrained(run_dir / "model").eval()
    batch = tok(TEXTS[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        states = enc(**batch).last_hidden_state  # (2, T, E)
    mask = batch["attention_mask"][..., None]
    want = ((states * mask).sum(1) / mask.sum(1)).numpy()
    assert got.shape == (2, enc.config.hidden_size)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert res.usage.prompt_tokens == int(batch["attention_mask"].sum())
    single = client.embeddings.create(model="tiny", input=TEXTS[0]).data[0].embedding
    np.testing.assert_allclose(single, got[0], atol=1e-4)  # padding in a batch does not change a row


def test_generation_routes_on_a_classifier_are_a_clear_400(clf):
    r = httpx.post(f"{clf.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_route"
    assert "/v1/classify" in r.json()["error"]["message"]


def test_load_2000_requests_at_concurrency_64_without_a_5xx(clf):
    """Each request is one text; the dynamic batcher must group them (mean batch size > 1)."""

    async def main():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=clf.url, limits=limits, timeout=60) as http:
            sem = asyncio.Semaphore(64)
            statuses, errors = [], []

            async def one(i):
                async with sem:
                    path = "/v1/classify" if i % 2 else "/v1/embeddings"
                    try:
                        r = await http.post(path, json={"input": f"request {i} was great"})
                        statuses.append(r.status_code)
                    except httpx.HTTPError as e:
                        errors.append(repr(e))

            await asyncio.gather(*(one(i) for i in range(2000)))
            return statuses, errors

    before_n = clf.metric("keel_batch_size_count")
    statuses, errors = asyncio.run(main())
    assert errors == [] and len(statuses) == 2000
    assert statuses.count(200) == 2000, {s: statuses.count(s) for s in set(statuses)}
    batches = clf.metric("keel_batch_size_count") - before_n
    assert batches < 0.8 * 2000  # requests shared forward passes


def test_schemathesis_finds_no_server_error(clf, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{clf.url}/openapi.json",
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--max-examples",
            "30",
            "--phases",
            "examples,coverage,fuzzing",
            "--generation-deterministic",
            "--request-timeout",
            "30",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_the_printed_curl_and_python_examples_work(clf):
    """What `keel serve` prints is pasted as is: the curl line and the openai snippet must both succeed."""
    import re
    import shlex

    lines = clf.log.splitlines()
    curl = next(line for line in lines if line.startswith("curl -s "))
    start = lines.index("python - <<'EOF'")
    snippet = "\n".join(lines[start + 1 : lines.index("EOF", start)])
    proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"'label': '(pos|neg)'", proc.stdout) and proc.stdout.strip().splitlines()[-1] == "32"
    args = shlex.split(curl)
    url = next(a for a in args if a.startswith("http"))
    body = args[args.index("-d") + 1]
    r = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 200 and len(r.json()["data"]) == 2


def _raw(texts) -> bytes:
    """A classify/embeddings body as the client sent it: json.dumps writes a lone surrogate as valid JSON."""
    import json

    return json.dumps({"input": texts}).encode()


def test_lone_surrogates_are_a_400_naming_input_and_fail_no_one_else(clf):
    """One client sends "\\ud800" (valid JSON, not text) among normal traffic that shares its batches."""
    poison = [
        ("/v1/classify", _raw("bad \ud800 text")),
        ("/v1/embeddings", _raw(["fine", "bad \udfff"])),
        ("/v1/classify", b'{"input": ["\\ud83d"], "explain": true}'),
    ]

    async def main():
        async with httpx.AsyncClient(base_url=clf.url, timeout=60) as http:

            async def one(path, raw):
                return path, raw, await http.post(path, content=raw, headers={"Content-Type": "application/json"})

            normal = [(("/v1/classify", "/v1/embeddings")[i % 2], _raw(f"request {i} was great")) for i in range(24)]
            mixed = normal[:12] + poison * 2 + normal[12:]
            return await asyncio.gather(*(one(p, r) for p, r in mixed))

    replies = asyncio.run(main())
    for path, raw, r in replies:
        if (path, raw) in poison:
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == "input" and err["code"] == "invalid_value" and "surrogate" in err["message"]
        else:
            assert r.status_code == 200, r.text
    assert "Traceback" not in clf.log


def test_explain_runs_apart_from_classify_traffic(clf):
    """A heavy explain request (16 texts x 256 steps) does not hold the classify requests sent after it."""

    async def main():
        async with httpx.AsyncClient(base_url=clf.url, timeout=120) as http:
            heavy = asyncio.ensure_future(
                http.post(
                    "/v1/classify",
                    json={"input": [f"{TEXTS[i % 4]} " * 8 for i in range(16)], "explain": True, "explain_steps": 256},
                )
            )
            for _ in range(200):  # until it is past its classification, explaining
                if heavy.done() or clf.metric('keel_queue_depth{kind="explain"}') >= 1:
                    break
                await asyncio.sleep(0.02)
            light = [await http.post("/v1/classify", json={"input": "a tiny one"}) for _ in range(3)]
            heavy_done_first = heavy.done()
            return light, heavy_done_first, await heavy

    light, heavy_done_first, heavy = asyncio.run(main())
    assert [r.status_code for r in light] == [200] * 3 and heavy.status_code == 200, heavy.text
    assert not heavy_done_first  # the tiny requests were answered while the explanation ran
    assert len(heavy.json()["data"]) == 16 and all(d["explanation"] for d in heavy.json()["data"])


@pytest.fixture(scope="module")
def short(run_dir):
    """The same run with a 1 s deadline, a 1 s read timeout, and room for an explanation that outlasts it."""
    server = Server(
        str(run_dir),
        "--set",
        "serve.timeout_s=1",
        "--set",
        "serve.read_timeout_s=1",
        "--set",
        "serve.num_threads=1",
        "--set",
        "serve.backend=torch",
        "--set",
        "serve.max_explain_inputs=128",
    )
    yield server
    server.stop()


def test_an_explanation_past_its_deadline_is_a_504_and_its_work_stops(short):
    # 128 texts x 256 steps: many seconds of work even on an idle machine, against a 1 s deadline
    heavy = {"input": [f"{TEXTS[i % 4]} " * 8 for i in range(128)], "explain": True, "explain_steps": 256}
    r = httpx.post(f"{short.url}/v1/classify", json=heavy, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    # The abandoned work stopped: a light explanation right behind it is not stuck behind it past its own deadline.
    light = httpx.post(
        f"{short.url}/v1/classify", json={"input": "a light one", "explain": True, "explain_steps": 4}, timeout=60
    )
    assert light.status_code == 200, light.text
    assert light.json()["data"][0]["explanation"]["model"] == "torch"


def _exchange(url: str, raw: bytes, timeout: float = 30) -> tuple[str, dict]:
    import json
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(raw)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, body = reply.decode().split("\r\n\r\n", 1)
    assert "content-type: application/json" in head.lower(), head
    return head.split("\r\n")[0], json.loads(body)


def test_slow_or_broken_requests_get_json_errors_and_hold_no_connection(short):
    status, body = _exchange(
        short.url,
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"input": ',
    )
    assert status.startswith("HTTP/1.1 408") and body["error"]["code"] == "body_timeout"
    status, body = _exchange(short.url, b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-")
    assert status.startswith("HTTP/1.1 408") and body["error"]["code"] == "header_timeout"
    for raw in (
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n",
        b"BREW /v1/classify HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        status, body = _exchange(short.url, raw)
        assert status.startswith("HTTP/1.1 400") and body["error"]["code"] == "invalid_http", raw
        assert set(body["error"]) == {"message", "type", "param", "code"}
    assert httpx.post(f"{short.url}/v1/classify", json={"input": "still fine"}, timeout=30).status_code == 200


def test_sigterm_with_a_client_still_sending_its_body_exits_within_the_drain(run_dir):
    """A client holding an unfinished body is not in flight: it gets 503, and the process exits 0 within
    serve.drain_timeout (+ margin) although serve.read_timeout_s would let it send for a minute."""
    import signal
    import socket

    server = Server(
        str(run_dir),
        "--set",
        "serve.read_timeout_s=60",
        "--set",
        "serve.drain_timeout=2",
        "--set",
        "serve.num_threads=1",
    )
    try:
        host, port = server.url.removeprefix("http://").split(":")
        slow = socket.create_connection((host, int(port)), timeout=30)
        slow.sendall(
            b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"input": '
        )
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=25)  # the old drain waited timeout_s + 5 s twice
        reply = slow.recv(65536).decode()
        slow.close()
    finally:
        server.stop()
    assert code == 0, server.log[-2000:]
    assert reply.startswith("HTTP/1.1 503") and '"draining"' in reply
