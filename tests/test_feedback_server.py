"""`POST /v1/feedback` on a real `keel serve` of a run: durability under `kill -9`, the route's rules over HTTP,
and a hot swap of the model version under load with no failed request."""

from __future__ import annotations

import asyncio
import shutil
import signal
import sqlite3
import threading

import httpx
import pytest
from conftest import TINY_RECIPE, write_toy_csv
from serve_helpers import Server, promote_under_load

pytestmark = pytest.mark.slow  # starts `keel serve` on a trained run

TEXTS = ["the car was great number 1", "this ride was awful number 2", "my trip was lovely", "a taxi was broken"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny trained classification run whose recipe keeps feedback texts (in-process training)."""
    from keel.pipeline import train_run
    from keel.recipe import load_recipe

    work = tmp_path_factory.mktemp("feedback")
    csv = write_toy_csv(work / "toy.csv", n=80)
    (work / "tiny.yaml").write_text(TINY_RECIPE.format(data=csv, epochs=1, every=0))
    overrides = [f"output.dir={work / 'runs' / 'tiny'}", "train.max_steps=2", "serve.feedback.store_text=true"]
    return train_run(load_recipe(work / "tiny.yaml", overrides))


def _classify(url: str, requests: int, per_request: int) -> list[tuple[str, int]]:
    """(response id, input index) pairs of ``requests`` classify responses of ``per_request`` texts each."""
    pairs = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for i in range(requests):
            texts = [f"{TEXTS[k % 4]} again {i}.{k}" for k in range(per_request)]
            r = c.post("/v1/classify", json={"input": texts})
            assert r.status_code == 200, r.text
            pairs += [(r.json()["id"], k) for k in range(per_request)]
    return pairs


def test_every_acknowledged_feedback_row_survives_kill_9(run_dir):
    db = run_dir / "feedback" / "feedback.sqlite"
    server = Server(str(run_dir), "--set", "serve.num_threads=1", "--set", "serve.feedback.poll_s=0")
    acked: dict[str, tuple[str, int]] = {}  # feedback id -> (response id, index), for every 200
    cut: list[int] = []  # requests the kill cut off (sent, never answered)
    try:
        pairs = _classify(server.url, 5, 64)
        killed = threading.Event()

        async def client(k: int, c: httpx.AsyncClient):
            for rid, idx in pairs[k::64]:
                try:
                    r = await c.post("/v1/feedback", json={"response_id": rid, "index": idx, "label": "pos"})
                except httpx.HTTPError:
                    cut.append(k)
                    return  # the server is gone
                assert r.status_code == 200, r.text
                acked[r.json()["id"]] = (rid, idx)
                if len(acked) >= 100 and not killed.is_set():
                    killed.set()
                    server.proc.send_signal(signal.SIGKILL)  # mid-way: the other clients' requests are in flight

        async def main():
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as c:
                await asyncio.gather(*(client(k, c) for k in range(64)))

        asyncio.run(main())
        server.proc.wait(timeout=30)
        assert killed.is_set() and server.proc.returncode == -signal.SIGKILL
    finally:
        server.stop()
    assert len(acked) >= 100 and cut, (len(acked), len(cut))  # killed with requests in flight, not after them
    conn = sqlite3.connect(db)  # recovers the WAL as any reader would
    stored = {f"fb-{i}": (rid, idx) for i, rid, idx in conn.execute("SELECT id, response_id, idx FROM feedback")}
    versions = {v for (v,) in conn.execute("SELECT DISTINCT model_version FROM feedback")}
    conn.close()
    missing = {k: v for k, v in acked.items() if stored.get(k) != v}
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged rows lost"
    assert versions == {"base"}


@pytest.fixture(scope="module")
def served(run_dir):
    server = Server(str(run_dir), "--set", "serve.num_threads=1", "--set", "serve.feedback.poll_s=0.2")
    yield server
    server.stop()


def test_feedback_route_rules_over_http(run_dir, served):
    with httpx.Client(base_url=served.url, timeout=30) as c:
        body = c.post("/v1/classify", json={"input": ["the bus was happy", "our drive was sad"]}).json()
        rid = body["id"]
        assert rid.startswith("clf-")
        ok = c.post("/v1/feedback", json={"response_id": rid, "index": 1, "label": "neg"})
        assert ok.status_code == 200 and ok.json()["kind"] == "label", ok.text
        assert ok.json()["model_version"] == "base"
        assert c.post("/v1/feedback", json={"response_id": rid, "thumbs": "down"}).status_code == 200
        for payload, status, param in [
            ({"response_id": "clf-nope", "label": "pos"}, 404, "response_id"),
            ({"response_id": rid, "label": "maybe"}, 400, "label"),
            ({"response_id": rid, "index": 2, "label": "pos"}, 400, "index"),
            ({"response_id": rid}, 400, "label"),
            ({"response_id": rid, "label": "pos", "thumbs": "up"}, 400, "thumbs"),
            ({"response_id": rid, "label": "pos", "extra": 1}, 400, "extra"),
        ]:
            bad = c.post("/v1/feedback", json=payload)
            assert bad.status_code == status, (payload, bad.text)
            assert bad.json()["error"]["param"] == param, bad.text
        huge = c.post(
            "/v1/feedback", content=b"{" + b" " * 3_000_000 + b"}", headers={"content-type": "application/json"}
        )
        assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"
    conn = sqlite3.connect(run_dir / "feedback" / "feedback.sqlite")
    rows = conn.execute(
        "SELECT label, thumbs, input_text, served_label, model_sha256 FROM feedback WHERE response_id = ? ORDER BY id",
        (rid,),
    ).fetchall()
    conn.close()
    assert rows[0][0] == "neg" and rows[0][2] == "our drive was sad"  # store_text is on in the run's recipe
    assert rows[0][3] in ("neg", "pos") and len(rows[0][4]) == 64  # what was served, and by which weights
    assert rows[1][:2] == (None, "down") and rows[1][2] == "the bus was happy"


def test_a_promoted_version_is_swapped_in_under_load_without_a_failed_request(run_dir, served):
    """A version (the run's own weights, copied as learn/v0001) is promoted while 16 clients classify and post
    feedback; every response is 200, and the feedback rows go from naming base to naming v0001."""

    def request(k: int, n: int):
        return "/v1/classify", {"input": [f"{TEXTS[k % 4]} {n}"]}

    try:
        statuses, seen = promote_under_load(
            served, run_dir, request, clients=16, before=40, after=40, timeout=300, ignore=("checkpoints",)
        )
    finally:
        shutil.rmtree(run_dir / "learn", ignore_errors=True)
    counts = {s: statuses.count(s) for s in set(statuses)}
    assert set(statuses) == {200}, (counts, served.log[-3000:])
    assert seen[0] == "base" and seen[-1] == "v0001"  # feedback names the version that answered
