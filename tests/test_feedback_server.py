"""`POST /v1/feedback` on a real `keel serve` of a run: durability under `kill -9`, the route's rules over HTTP,
and a hot swap of the model version under load with no failed request."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sqlite3
import threading
import time

import httpx
import pytest
from conftest import TINY_RECIPE, write_toy_csv
from serve_helpers import Server

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


def _classify(url: str, n: int) -> list[str]:
    ids = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for i in range(n):
            r = c.post("/v1/classify", json={"input": [f"{TEXTS[i % 4]} again {i}"]})
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"])
    return ids


def test_every_acknowledged_feedback_row_survives_kill_9(run_dir, tmp_path):
    db = run_dir / "feedback" / "feedback.sqlite"
    server = Server(str(run_dir), "--set", "serve.num_threads=1", "--set", "serve.feedback.poll_s=0")
    try:
        ids = _classify(server.url, 200)
        acked: dict[str, str] = {}  # feedback id -> response id, for every 200
        killed = threading.Event()

        async def client(k: int, c: httpx.AsyncClient):
            for j in range(k, len(ids), 64):
                try:
                    r = await c.post("/v1/feedback", json={"response_id": ids[j], "label": "pos"})
                except httpx.HTTPError:
                    return  # the server is gone
                if r.status_code == 200:
                    acked[r.json()["id"]] = ids[j]
                if len(acked) >= 80 and not killed.is_set():
                    killed.set()
                    server.proc.send_signal(signal.SIGKILL)  # mid-way: other clients' requests are in flight

        async def main():
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as c:
                await asyncio.gather(*(client(k, c) for k in range(64)))

        asyncio.run(main())
        server.proc.wait(timeout=30)
        assert killed.is_set() and server.proc.returncode == -signal.SIGKILL
    finally:
        server.stop()
    assert len(acked) >= 80
    conn = sqlite3.connect(db)  # recovers the WAL as any reader would
    stored = {f"fb-{i}": rid for i, rid in conn.execute("SELECT id, response_id FROM feedback")}
    versions = {v for (v,) in conn.execute("SELECT DISTINCT model_version FROM feedback")}
    conn.close()
    missing = {k: v for k, v in acked.items() if stored.get(k) != v}
    assert not missing, f"{len(missing)} acknowledged rows lost"
    assert versions == {"base"}


def test_feedback_route_rules_over_http(run_dir):
    server = Server(str(run_dir), "--set", "serve.num_threads=1", "--set", "serve.feedback.poll_s=0")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.post("/v1/classify", json={"input": ["the bus was happy", "our drive was sad"]})
            body = r.json()
            assert body["id"].startswith("clf-")
            rid = body["id"]
            ok = c.post("/v1/feedback", json={"response_id": rid, "index": 1, "label": "neg"})
            assert ok.status_code == 200 and ok.json()["kind"] == "label", ok.text
            assert ok.json()["model_version"] == "base"
            thumbs = c.post("/v1/feedback", json={"response_id": rid, "thumbs": "down"})
            assert thumbs.status_code == 200
            for payload, status, param in [
                ({"response_id": "clf-nope", "label": "pos"}, 404, "response_id"),
                ({"response_id": rid, "label": "maybe"}, 400, "label"),
                ({"response_id": rid, "index": 2, "label": "pos"}, 400, "index"),
                ({"response_id": rid}, 400, "label"),
                ({"response_id": rid, "label": "pos", "extra": 1}, 400, "extra"),
            ]:
                bad = c.post("/v1/feedback", json=payload)
                assert bad.status_code == status, (payload, bad.text)
                assert bad.json()["error"]["param"] == param, bad.text
            huge = c.post(
                "/v1/feedback", content=b"{" + b" " * 3_000_000 + b"}", headers={"content-type": "application/json"}
            )
            assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"
    finally:
        server.stop()
    rows = [
        json.loads(json.dumps(dict(zip(("label", "input_text", "served_label"), r))))
        for r in sqlite3.connect(run_dir / "feedback" / "feedback.sqlite").execute(
            "SELECT label, input_text, served_label FROM feedback WHERE response_id = ? ORDER BY id", (rid,)
        )
    ]
    assert rows[0]["label"] == "neg" and rows[0]["input_text"] == "our drive was sad"  # store_text is on
    assert rows[1]["label"] is None


def test_a_promoted_version_is_swapped_in_under_load_without_a_failed_request(run_dir):
    """A version (the run's own weights, copied as learn/v0001) is promoted while 16 clients classify; every
    response is 200 and the later ones, and their feedback rows, name the new version."""
    from keel.io import atomic_write_json
    from keel.rundir import learn_state_file, version_dir

    server = Server(str(run_dir), "--set", "serve.num_threads=1", "--set", "serve.feedback.poll_s=0.2")
    version = version_dir(run_dir, "v0001")
    statuses: list[int] = []
    seen: list[str] = []
    try:
        stop = time.monotonic() + 600
        done = threading.Event()

        async def client(k: int, c: httpx.AsyncClient):
            while not done.is_set() and time.monotonic() < stop:
                r = await c.post("/v1/classify", json={"input": [f"{TEXTS[k % 4]} {len(statuses)}"]})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    fb = await c.post("/v1/feedback", json={"response_id": r.json()["id"], "thumbs": "up"})
                    statuses.append(fb.status_code)
                    seen.append(fb.json().get("model_version"))

        def promote():
            while len(statuses) < 40:
                time.sleep(0.05)
            shutil.copytree(run_dir, version.with_name("tmp-v0001"), ignore=shutil.ignore_patterns("learn", "feedback"))
            version.parent.mkdir(parents=True, exist_ok=True)
            version.with_name("tmp-v0001").rename(version)
            atomic_write_json(learn_state_file(run_dir), {"current": "v0001", "history": ["base", "v0001"]})
            end = time.monotonic() + 300
            while time.monotonic() < end and "swapped model version base -> v0001" not in server.log:
                time.sleep(0.1)
            n = len(seen)
            while len(seen) < n + 40 and time.monotonic() < end:
                time.sleep(0.05)
            done.set()

        async def main():
            worker = asyncio.get_running_loop().run_in_executor(None, promote)
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
                await asyncio.gather(*(client(k, c) for k in range(16)))
            await worker

        asyncio.run(main())
    finally:
        server.stop()
        shutil.rmtree(version, ignore_errors=True)
        learn_state_file(run_dir).unlink(missing_ok=True)
    assert "swapped model version base -> v0001" in server.log, server.log[-3000:]
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert seen[0] == "base" and seen[-1] == "v0001"  # feedback names the version that answered
