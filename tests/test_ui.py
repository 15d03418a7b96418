"""`keel ui`: the readers on fabricated run folders (shaped as a real run's), the comparison, escaping, paths from
requests, auth; end to end in headless Chromium against a real `keel serve` of a tiny causal LM."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import OFFLINE
from web_browser import AddressedProcess

EVIL = "b<script>alert(1)"  # a run folder's name (a name cannot hold a slash, so no closing tag)
EVIL_TEXT = "[/b]<script>alert(2)</script>"  # a model name, a label and a text from outside


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def _variant(name: str, acc: float, thr: float, mb: float) -> dict:
    return {"variant": name, "accuracy": acc, "throughput_batch32": thr, "disk_mb": mb, "p50_ms_batch1": 1000 / thr}


def _group(name: str, n: int, rate: float, ranked: bool = True) -> dict:
    return {"group": name, "n": n, "selection_rate": rate, "accuracy": 0.8, "tpr": 0.7, "fpr": 0.1, "ranked": ranked}


def make_run(root: Path, name: str, status: str = "finished", model: str = "tiny-bert", lr: str = "3.0e-3", **extra):
    """A run folder holding what `keel run` writes (run.json, recipe.yaml, metrics.jsonl, eval/test.json, ...)."""
    run = root / name
    train = {"steps": 16, "best_metric": 0.61, "selection_metric": "macro_f1", "samples_per_second": 12.5}
    started = extra.pop("started", "2026-12-01T10:00:00+0000")
    info = {"name": "tiny", "task": "classification", "status": status, "started": started, "train": train}
    _write(run / "run.json", {**info, **extra.pop("info", {})})
    _write(
        run / "recipe.yaml",
        f"# keel 0.1.0, recipe sha256 abc\nname: tiny\ntask: classification\nmodel:\n  name: '{model}'\n"
        f"train:\n  lr: {lr}\n",
    )
    lines = [{"step": s, "epoch": 1, "loss": 1.0 / s, "lr": 0.001} for s in range(1, 17)]
    lines.append({"split": "validation", "step": 16, "epoch": 1, "loss": 0.7, "accuracy": 0.6, "macro_f1": 0.61})
    _write(run / "metrics.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    for rel, doc in extra.items():
        _write(run / rel, doc)
    return run


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    make_run(
        root,
        "alpha",
        started="2026-12-01T12:00:00+0000",
        **{
            "eval/test.json": {"accuracy": 0.75, "macro_f1": 0.7, "n": 40, "loss": 0.5, "baseline": {"accuracy": 0.5}},
            "bench.json": {
                "split": "validation",
                "variants": [
                    _variant("teacher-torch", 0.80, 100.0, 90.0),
                    _variant("teacher-onnx-int8", 0.78, 300.0, 25.0),
                    _variant("pruned-onnx", 0.76, 250.0, 30.0),  # beaten by teacher-onnx-int8 on all three
                    _variant("pruned-onnx-int8", 0.77, 500.0, 7.0),
                ],
            },
            "compress/deployable.json": {"deployable": "pruned-onnx-int8", "test": {"accuracy": 0.74}, "figures": {}},
            "audit/fairness.json": {
                "attributes": {
                    "gender": {
                        "demographic_parity_difference": 0.2,
                        "equalized_odds_difference": 0.3,
                        "groups": [_group("none", 60, 0.5), _group("female", 30, 0.6), _group("male", 10, 0.1, False)],
                    }
                }
            },
            "report.html": "<!doctype html><html><body><h1>keel report: alpha</h1></body></html>",
        },
    )
    make_run(
        root,
        EVIL,
        status="failed",
        model=EVIL_TEXT,
        lr="1.0e-4",
        info={
            "error": "ValueError: boom",
            "train": {"privacy": {"epsilon": 2.5, "target_epsilon": 3.0, "delta": 1e-5, "noise_multiplier": 1.1}},
        },
        **{
            "audit/fairness.json": {
                "attributes": {
                    "gender": {
                        "demographic_parity_difference": 0.05,
                        "equalized_odds_difference": None,
                        "groups": [_group("none", 50, 0.4), _group("female", 50, 0.45)],
                    }
                }
            },
            "labels/pool-0123456789ab.jsonl": json.dumps({"row": 3, "text": EVIL_TEXT, "label": EVIL_TEXT}) + "\n",
            "labels/pool-0123456789ab.rounds.jsonl": json.dumps(
                {"session": 1, "round": 0, "labels": 1, "validation_accuracy": 0.55, "strategy": "entropy"}
            ),
        },
    )
    make_run(
        root,
        "live",
        status="running",
        info={},
        **{".keel.lock": {"pid": os.getpid(), "command": "keel label runs/live --pool p.csv --web"}},
    )
    make_run(root, "killed", status="running", started="2026-11-30T09:00:00+0000")
    outside = tmp_path_factory.mktemp("outside")
    make_run(outside, "secret")
    (root / "link").symlink_to(outside / "secret")
    return root


# -- the readers ---------------------------------------------------------------------------------------------


def test_the_runs_list_reads_status_headline_and_the_deployable_pick(root):
    from keel.ui.runs import list_runs

    found = {r["name"]: r for r in list_runs(root)}
    assert set(found) == {"alpha", EVIL, "live", "killed"}  # the symlink out of the folder is not a run here
    assert [r["name"] for r in list_runs(root)][0] == "alpha"  # newest first
    test = json.loads((root / "alpha" / "eval" / "test.json").read_text())
    assert dict(found["alpha"]["headline"])["test accuracy"] == test["accuracy"]
    assert found["alpha"]["deployable"] == "pruned-onnx-int8" and found["alpha"]["status"] == "done"
    assert found[EVIL]["status"] == "failed" and "boom" in found[EVIL]["status_detail"]
    assert found["live"]["status"] == "running"  # its lock names a live process (this one)
    assert found["killed"]["status"] == "stopped"  # says running, but nobody holds it
    assert found[EVIL]["model"] == EVIL_TEXT and found[EVIL]["has_labels"]
    assert dict(found["killed"]["headline"]) == {"best validation macro_f1": 0.61}  # no test.json: the best one


def test_a_name_from_a_request_never_leaves_the_runs_folder(root):
    from keel.ui.runs import run_path

    assert run_path(root, "alpha") == (root / "alpha").resolve()
    for name in ("..", ".", "../alpha", "alpha/..", str(root / "alpha"), "/etc", "link", "", "nope", "a\0b"):
        assert run_path(root, name) is None, name


def test_the_comparison_lines_up_metrics_gaps_fronts_privacy_and_the_recipe_diff(root):
    from keel.ui.compare import fairness_gaps, front, metrics_rows, pareto_points, privacy_rows, recipe_diff
    from keel.ui.runs import details

    a, b = details(root / "alpha"), details(root / EVIL)
    rows = dict(metrics_rows([a, b]))
    assert rows["test accuracy"] == [a["test"]["accuracy"], None]
    assert rows["epsilon spent"] == [None, b["privacy"]["epsilon"]]
    groups = a["fairness"]["attributes"]["gender"]["groups"]
    overall = sum(g["n"] * g["selection_rate"] for g in groups) / sum(g["n"] for g in groups)
    gaps = {g["group"]: g for g in fairness_gaps(a)["gender"]["groups"]}
    assert set(gaps) == {"female", "male"}  # texts naming no group count in the overall rate only
    assert gaps["female"]["gap"] == pytest.approx(0.6 - overall) and not gaps["male"]["ranked"]
    points = pareto_points(a)
    best = front([(p["throughput"], p["accuracy"]) for p in points], higher_x=True)
    named = {(p["throughput"], p["accuracy"]): p["variant"] for p in points}
    assert {named[x] for x in best} == {"teacher-torch", "teacher-onnx-int8", "pruned-onnx-int8"}
    by_size = {(p["mb"], p["accuracy"]): p["variant"] for p in points}
    small = front(list(by_size), higher_x=False)
    assert {by_size[x] for x in small} == {"teacher-torch", "teacher-onnx-int8", "pruned-onnx-int8"}
    assert [p["dp"] for p in privacy_rows([a, b])] == [False, True]
    diff = recipe_diff(a, b)
    assert "-  lr: 3.0e-3" in diff and "+  lr: 1.0e-4" in diff


# -- the app, in process --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(root):
    from starlette.testclient import TestClient

    from keel.ui.app import build_app

    return TestClient(build_app(root, [], None), base_url="http://127.0.0.1:8100")


def test_strings_from_outside_show_as_text_on_every_page(client):
    from urllib.parse import quote

    evil = quote(EVIL, safe="")
    for url in ("/", f"/run/{evil}", f"/run/{evil}/labels", f"/compare?runs=alpha,{evil}"):
        r = client.get(url)
        assert r.status_code == 200, url
        assert "<script>alert" not in r.text and "<script" not in r.text.replace("<script nonce=", ""), url
        assert "&lt;script&gt;alert(1)" in r.text, url
    assert "[/b]&lt;script&gt;alert(2)&lt;/script&gt;" in client.get(f"/run/{evil}/labels").text
    page = client.get(f"/compare?runs=alpha,{evil}").text
    assert page.count("<svg") == 2  # fairness gaps and the Pareto fronts
    assert "b&lt;script&gt;alert(1)</text>" in page  # the legend of the plot: escaped text, not markup


def test_the_labels_page_says_when_a_labelling_session_is_open(client):
    assert "A labelling session is open now" in client.get("/run/live/labels").text
    assert "A labelling session is open now" not in client.get("/run/alpha/labels").text


def test_paths_from_requests_that_leave_the_runs_folder_are_404(client):
    for url in (
        "/run/%2e%2e",
        "/run/%2e%2e/report",
        "/run/%2Fetc%2Fpasswd",
        "/run/..%2F..%2Fetc/report",
        "/run/link",
        "/run/link/report",
        "/compare?runs=alpha,..",
        "/compare?runs=alpha,/etc",
        "/run/killed/report",  # a run without report.html
    ):
        r = client.get(url)
        assert r.status_code == 404, url
        assert "content-security-policy" in r.headers


def test_pages_carry_a_strict_csp_and_the_report_is_sandboxed(client):
    page = client.get("/run/alpha")
    policy = page.headers["content-security-policy"]
    nonce = re.search(r"'nonce-([^']+)'", policy).group(1)
    assert "script-src 'nonce-" in policy and "'unsafe-inline'" not in policy.split("script-src")[1].split(";")[0]
    assert "<iframe sandbox " in page.text and f"<style nonce='{nonce}'>" in page.text
    report = client.get("/run/alpha/report")
    assert "sandbox" in report.headers["content-security-policy"].split(";")[3]
    assert report.text == (Path(client.app.state.console.root) / "alpha" / "report.html").read_text()


def test_a_page_elsewhere_cannot_reach_the_console(client):
    assert client.get("/", headers={"host": "evil.example:8100"}).status_code == 403  # DNS rebinding
    r = client.post("/api/chat", json={"messages": []}, headers={"origin": "http://evil.example"})
    assert r.status_code == 403


def test_with_keys_every_page_needs_a_key_or_the_session_cookie(root):
    from starlette.testclient import TestClient

    from keel.serve.guard import digest
    from keel.ui.app import build_app

    web = TestClient(build_app(root, [digest("s3cret-key-1")], None), base_url="http://192.0.2.1:8100")
    assert web.get("/", follow_redirects=False).headers["location"] == "/login"
    forged = {"keel_ui_session": "made-up-session-token"}
    assert web.get("/", cookies=forged, follow_redirects=False).status_code == 303
    assert web.get("/run/alpha/report", follow_redirects=False).status_code == 303
    assert web.post("/api/chat", json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 401
    assert web.get("/", headers={"authorization": "Bearer s3cret-key-1"}).status_code == 200
    assert web.post("/login", data={"key": "wrong-key-00"}).status_code == 401
    r = web.post("/login", data={"key": "s3cret-key-1"}, follow_redirects=False)
    assert r.status_code == 303 and "httponly" in r.headers["set-cookie"].lower()
    assert web.get("/").status_code == 200  # the cookie from /login


def test_the_chat_proxy_forwards_to_keel_serve_with_the_key_the_page_never_sees(root):
    import httpx
    from starlette.testclient import TestClient

    from keel.ui.app import build_app

    seen = []

    def serve(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "tiny-llama"}]})
        body = json.loads(request.content)
        if body["max_tokens"] > 100:
            return httpx.Response(400, json={"error": {"message": "max_tokens is over 100", "param": "max_tokens"}})
        reply = EVIL_TEXT + body["messages"][-1]["content"]
        return httpx.Response(200, json={"model": "tiny-llama", "choices": [{"message": {"content": reply}}]})

    app = build_app(root, [], "http://127.0.0.1:9", "serve-key-123", transport=httpx.MockTransport(serve))
    web = TestClient(app, base_url="http://127.0.0.1:8100")
    page = web.get("/chat")
    assert "tiny-llama" in page.text and "serve-key-123" not in page.text
    r = web.post("/api/chat", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
    assert r.status_code == 200 and r.json()["reply"] == EVIL_TEXT + "hi"  # text in JSON; the page sets textContent
    assert seen[-1].url.path == "/v1/chat/completions" and seen[-1].headers["authorization"] == "Bearer serve-key-123"
    r = web.post("/api/chat", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200})
    assert r.status_code == 400 and "max_tokens is over 100" in r.json()["error"]
    for bad in ({"messages": []}, {"messages": [{"role": "root", "content": "x"}]}, {"messages": "hi"}):
        assert web.post("/api/chat", json=bad).status_code == 400
    assert (
        web.post("/api/chat", content=b"x" * 300_000, headers={"content-type": "application/json"}).status_code == 413
    )


@pytest.mark.parametrize(
    "args, says",
    [
        (["--host", "0.0.0.0"], "refusing to serve on 0.0.0.0 without API keys"),
        (["--serve-url", "ftp://x"], "--serve-url must be"),
        (["--port", "70000"], "--port must be"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(root, monkeypatch, capsys, args, says):
    from keel.cli import main

    monkeypatch.delenv("KEEL_API_KEYS", raising=False)
    monkeypatch.setattr(logging.getLogger("keel"), "propagate", True)  # the CLI's root callback turns it off
    monkeypatch.setattr(sys, "argv", ["keel", "ui", str(root), *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    out = capsys.readouterr()
    text = " ".join((out.out + out.err).split())
    assert exit_.value.code == 2 and says in text and "Traceback" not in text


# -- end to end: keel ui in headless Chromium, chat through a real keel serve ----------------------------------


class UI(AddressedProcess):
    def __init__(self, root: Path, *args: str):
        env = {**os.environ, **OFFLINE}
        env.pop("KEEL_API_KEYS", None)
        cmd = [sys.executable, "-m", "keel", "ui", str(root), "--port", "0", *args]
        super().__init__(cmd, r" at (http://127\.0\.0\.1:\d+)", "keel ui", env=env, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_every_page_loads_in_chromium_and_a_chat_round_trip_completes(root, tmp_path):
    from urllib.parse import quote

    from serve_helpers import Server
    from web_browser import Chromium, chromium, off_origin

    if chromium() is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    lm = Server("tiny-llama", "--set", "serve.num_threads=1")
    ui = UI(root, "--serve-url", lm.url)
    page = Chromium(tmp_path / "profile")
    try:
        page.load(ui.url + "/")
        assert page.evaluate("document.querySelectorAll('tbody tr, table tr').length") >= 5
        assert page.evaluate("document.body.innerText").count("<script>alert(1)") == 1  # shown, not run
        page.load(ui.url + "/run/alpha")
        assert page.evaluate("document.querySelectorAll('svg').length") == 1  # the training curves
        assert page.evaluate("document.querySelector('iframe[sandbox]').getAttribute('src')") == "/run/alpha/report"
        page.load(f"{ui.url}/compare?runs=alpha,{quote(EVIL, safe='')}")
        sizes = page.evaluate("[...document.querySelectorAll('svg')].map(s => s.getBoundingClientRect().width)")
        assert len(sizes) == 2 and min(sizes) > 100  # both plots drawn, with a size
        page.load(f"{ui.url}/run/{quote(EVIL, safe='')}/labels")
        assert EVIL_TEXT in page.evaluate("document.body.innerText")
        page.load(ui.url + "/chat")
        page.evaluate("document.getElementById('max_tokens').value = '8'")
        reply = page.evaluate("window.keel.send('Hello there')", timeout=120)
        assert isinstance(reply, str)
        shown = page.evaluate("[...document.querySelectorAll('#log .msg')].map(p => p.className)")
        assert shown == ["msg user", "msg assistant"]
        model = page.evaluate("document.querySelector('#log .assistant').dataset.model")
        assert model and model in page.evaluate("document.getElementById('serve-state').innerText")
        assert page.errors == []
        assert off_origin(page.requested, ui.url) == []  # the page never talks to keel serve (or anyone) itself
        assert any(u.endswith("/run/alpha/report") for u in page.requested)
    finally:
        page.close()
        ui.stop()
        lm.stop()
    assert ui.proc.returncode in (0, -15)
