"""`keel serve tiny-llama` with API keys, on loopback, driven by the official openai client and raw HTTP:
completions, chat, streaming, auth over every route, limits and error envelopes, logs, stream cancel."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from conftest import OFFLINE, keel
from serve_helpers import Server

pytestmark = pytest.mark.slow  # starts `keel serve`

KEY, KEY2 = "test-key-0123456789", "second-key-abcdefgh"
AUTH = {"Authorization": f"Bearer {KEY}"}
SECRET_PROMPT = "zebra-quartz-unlikely-prompt"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"# one key per line\n{KEY2}\n")
    server = Server(
        "tiny-llama",
        "--api-key-file",
        str(key_file),
        "--set",
        "serve.max_n=4",
        "--set",
        "serve.max_inputs=4",
        "--set",
        "serve.num_threads=1",
        env={"KEEL_API_KEYS": KEY},
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(lm):
    from openai import OpenAI

    return OpenAI(base_url=f"{lm.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_openai_client_completions_and_chat(client):
    c = client.completions.create(model="tiny-llama", prompt=f"{SECRET_PROMPT} Hello", max_tokens=6, temperature=0)
    assert len(c.choices) == 1 and c.object == "text_completion" and c.model == "tiny-llama"
    choice = c.choices[0]
    assert choice.finish_reason in ("length", "stop") and isinstance(choice.text, str)
    assert c.usage.completion_tokens == (6 if choice.finish_reason == "length" else c.usage.completion_tokens)
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens and c.usage.prompt_tokens > 1

    chat = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
        max_tokens=5,
        n=3,
        seed=1,
        temperature=1.0,
    )
    assert [ch.index for ch in chat.choices] == [0, 1, 2]
    assert all(ch.message.role == "assistant" for ch in chat.choices)
    # the chat template was applied: the prompt is longer than the two messages' words
    assert chat.usage.prompt_tokens > 8
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]


def test_streaming_equals_non_streaming_with_the_same_seed(client):
    args = dict(model="tiny-llama", prompt="Once upon a time", max_tokens=12, temperature=0.8, top_p=0.9, seed=42)
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert text == whole.choices[0].text and finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    msgs = [{"role": "user", "content": "Tell me a story"}]
    chat = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=10, seed=3)
    stream = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=10, seed=3, stream=True)
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == chat.choices[0].message.content


def test_stream_ends_with_done(lm):
    body = {"prompt": "Hello", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{lm.url}/v1/completions", json=body, headers=AUTH, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


ROUTES = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("POST", "/v1/embeddings", {"input": "hi"}),
    ("POST", "/v1/classify", {"input": "hi"}),
    ("POST", "/v1/feedback", {"response_id": "cmpl-x", "thumbs": "up"}),
    ("GET", "/metrics", None),
    ("GET", "/docs", None),
    ("GET", "/openapi.json", None),
    ("GET", "/no/such/route", None),
]


@pytest.mark.parametrize("method,path,body", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_auth_on_every_route(lm, method, path, body):
    url = f"{lm.url}{path}"
    for headers in (
        {},
        {"Authorization": "Bearer wrong-key-123456"},
        {"Authorization": KEY},
        {"Authorization": f"Basic {KEY}"},
    ):
        r = httpx.request(method, url, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    for key in (KEY, KEY2):  # the env key and the file key both work
        r = httpx.request(method, url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code != 401, r.text
        assert r.status_code < 500


def test_health_probes_need_no_key(lm):
    assert httpx.get(f"{lm.url}/health/live").json() == {"status": "ok"}
    assert httpx.get(f"{lm.url}/health/ready").json()["status"] == "ready"


def _post(lm, path, body, **kw):
    return httpx.post(f"{lm.url}{path}", json=body, headers=AUTH, timeout=30, **kw)


@pytest.mark.parametrize(
    "path,body,status,param,code",
    [
        ("/v1/completions", {"prompt": "word " * 600}, 400, "prompt", "context_length_exceeded"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "word " * 600}]},
            400,
            "messages",
            "context_length_exceeded",
        ),
        ("/v1/completions", {"prompt": "word " * 400, "max_tokens": 200}, 400, "max_tokens", "context_length_exceeded"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 100000}, 400, "max_tokens", "invalid_value"),
        ("/v1/completions", {"prompt": "hi", "n": 5}, 400, "n", "invalid_value"),
        ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
        ("/v1/completions", {"prompt": "hi", "temperature": 3}, 400, "temperature", "invalid_value"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", "invalid_value"),
        ("/v1/completions", {"prompt": "hi", "max_tokenz": 3}, 400, "max_tokenz", "unknown_field"),
        ("/v1/completions", {"prompt": []}, 400, "prompt", "invalid_value"),
        ("/v1/completions", {}, 400, "prompt", "missing_field"),
        ("/v1/completions", {"prompt": "hi", "model": "gpt-4o"}, 404, "model", "model_not_found"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages", "invalid_value"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "robot", "content": "x"}]},
            400,
            "messages.0.role",
            "invalid_value",
        ),
        ("/v1/embeddings", {"input": "hi"}, 400, "model", "unsupported_route"),
        ("/v1/classify", {"input": ["a"] * 300}, 400, "model", "unsupported_route"),
    ],
)
def test_bad_requests_get_the_envelope_with_the_param(lm, path, body, status, param, code):
    r = _post(lm, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == code and err["message"] and err["type"]


def test_malformed_bodies_are_4xx_envelopes(lm):
    cases = [
        (b"{not json", "application/json", 400),
        (b"[1, 2]", "application/json", 400),
        (b'"text"', "application/json", 400),
        (b"prompt=hi", "application/x-www-form-urlencoded", 415),
        (b"", "application/json", 400),
    ]
    for raw, ctype, status in cases:
        r = httpx.post(f"{lm.url}/v1/completions", content=raw, headers={**AUTH, "Content-Type": ctype}, timeout=30)
        assert r.status_code == status, (raw, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.delete(f"{lm.url}/v1/models", headers=AUTH)
    assert r.status_code == 405 and "error" in r.json()


def test_empty_undecodable_and_unparsable_requests_say_what_is_wrong(lm):
    r = httpx.post(f"{lm.url}/v1/completions", content=b"", headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_body" and "None" not in r.text
    r = httpx.post(
        f"{lm.url}/v1/completions", content=b'{"prompt": "\xff"}', headers={**AUTH, "Content-Type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    host, port = lm.url.removeprefix("http://").split(":")
    for raw in (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 12x\r\n\r\n",
        b"FETCH /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
    ):  # refused by the HTTP parser, before the app
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(raw)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        head, body = reply.decode().split("\r\n\r\n", 1)
        assert head.startswith("HTTP/1.1 400") and "content-type: application/json" in head.lower(), reply
        assert json.loads(body)["error"]["code"] == "invalid_http"


def test_a_20mb_body_is_refused_before_it_is_read(lm):
    host, port = lm.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 20000000\r\n\r\n".encode()
            + b"{" * 1000
        )
        reply = b""  # the answer comes while 19.99 MB are still unsent
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, body = reply.decode().split("\r\n\r\n", 1)
    assert head.startswith("HTTP/1.1 413")
    assert json.loads(body)["error"]["code"] == "body_too_large"
    # chunked (no Content-Length): counted while read, refused past the limit
    r = httpx.post(
        f"{lm.url}/v1/completions",
        content=iter([b"x" * 1_000_000] * 3),
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 413


def test_no_key_and_no_prompt_text_in_the_logs(lm, client):
    client.completions.create(model="tiny-llama", prompt=SECRET_PROMPT, max_tokens=3)
    time.sleep(0.2)
    assert lm.lines and KEY not in lm.log and KEY2 not in lm.log and SECRET_PROMPT not in lm.log


def test_stream_cancel_on_disconnect_stops_generation(lm):
    before = lm.metric("keel_generated_tokens_total", AUTH)
    body = {"prompt": "Hello", "max_tokens": 500, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{lm.url}/v1/completions", json=body, headers=AUTH, timeout=30) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got >= 3:
                break  # the client goes away mid-stream
    deadline = time.time() + 10
    while lm.metric("keel_running_sequences", AUTH) > 0 and time.time() < deadline:
        time.sleep(0.05)
    assert lm.metric("keel_running_sequences", AUTH) == 0
    time.sleep(0.3)
    generated = lm.metric("keel_generated_tokens_total", AUTH) - before
    assert 3 <= generated < 500


def test_metrics_count_requests_latency_and_batches(lm, client):
    client.completions.create(model="tiny-llama", prompt="hi", max_tokens=3)
    text = httpx.get(f"{lm.url}/metrics", headers=AUTH).text
    for name in (
        "keel_requests_total",
        "keel_request_latency_seconds_bucket",
        "keel_batch_size_bucket",
        "keel_queue_depth",
        "keel_generation_tokens_per_second",
        "keel_generated_tokens_total",
    ):
        assert name in text, name
    assert 'route="/v1/completions",status="200"' in text


def test_refuses_a_public_bind_without_keys(tmp_path):
    r = keel("serve", "tiny-llama", "--host", "0.0.0.0", "--port", "0", cwd=tmp_path, env={"KEEL_API_KEYS": ""})
    assert r.returncode == 2 and "without API keys" in r.stderr and "Traceback" not in r.stderr


def test_a_public_bind_without_keys_does_not_claim_loopback_only(tmp_path):
    cmd = [sys.executable, "-m", "keel", "serve", "tiny-llama", "--host", "0.0.0.0", "--port", "0", "--allow-no-auth"]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **OFFLINE, "KEEL_API_KEYS": ""},
    )
    try:
        line = next((ln for ln in proc.stdout if ln.startswith("serving ")), "")
    finally:
        proc.kill()
        proc.wait()
    assert "keys: none" in line and "loopback only" not in line and "0.0.0.0" in line and "--allow-no-auth" in line


def test_schemathesis_finds_no_server_error_on_generation_routes(lm, tmp_path):
    """Fuzzing every operation of the OpenAPI spec with a valid key: no 5xx, answers match the spec."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{lm.url}/openapi.json",
            "-H",
            f"Authorization: Bearer {KEY}",
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--max-examples",
            "10",
            "--phases",
            "examples,coverage,fuzzing",
            "--generation-deterministic",
            "--request-timeout",
            "60",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert KEY not in lm.log


def test_bad_serve_options_are_one_line_errors(tmp_path):
    r = keel("serve", "tiny-llama", "--set", "serve.max_batch_size=0", cwd=tmp_path)
    assert r.returncode == 2 and "serve.max_batch_size" in r.stderr and "Traceback" not in r.stderr
    r = keel("serve", "tiny-llama", "--set", "train.lr=1", cwd=tmp_path)
    assert r.returncode == 2 and "only serve.* keys" in r.stderr
    r = keel("serve", str(tmp_path / "missing-run"), cwd=tmp_path)
    assert r.returncode == 2 and "missing-run" in r.stderr and "Traceback" not in r.stderr
