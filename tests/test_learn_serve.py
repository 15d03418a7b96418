"""`keel serve RUN --learn`: rounds on a schedule in a child process, promotions swapped in while every request
is answered; a failed round is recorded and the schedule goes on."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time

import pytest
from conftest import TINY_RECIPE, write_toy_csv

from keel.errors import KeelError


def test_a_failed_round_is_recorded_with_its_error_line(tmp_path, monkeypatch):
    import keel.learn.schedule as sched

    monkeypatch.setattr(
        sched, "_command", lambda run_dir: [sys.executable, "-c", "import sys; sys.exit('learn: disk full')"]
    )
    schedule = sched.Schedule(tmp_path, 1.0, 1, ("label",))
    outcome = asyncio.run(sched.run_round(schedule, 41))
    assert outcome["ok"] is False
    decision = json.loads((tmp_path / "learn" / "decisions" / "0001.json").read_text())
    assert decision["action"] == "failed" and "learn: disk full" in decision["why"]
    assert sched.last_read(tmp_path) == 41  # the next round waits for rows after the ones this one would have read


def test_the_schedule_is_read_from_the_recipe_and_the_flag_overrides_it(tmp_path):
    from keel.learn.schedule import check_serving, schedule_for
    from keel.recipe import validate_serve
    from keel.recipe.learn import duration_seconds

    assert duration_seconds("30m") == 1800 and duration_seconds("1.5h") == 5400 and duration_seconds(90) == 90
    with pytest.raises(ValueError, match="learn.every must be a duration"):
        duration_seconds("soon")
    with pytest.raises(KeelError, match="not one"):
        schedule_for(tmp_path)
    with pytest.raises(KeelError, match="store_text: true"):
        check_serving(validate_serve({}))
    check_serving(validate_serve({"feedback": {"store_text": True}}))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from keel.pipeline import train_run
    from keel.recipe import load_recipe

    work = tmp_path_factory.mktemp("learn-serve")
    csv = write_toy_csv(work / "toy.csv", n=80)
    (work / "tiny.yaml").write_text(TINY_RECIPE.format(data=csv, epochs=1, every=0))
    overrides = [
        f"output.dir={work / 'runs' / 'tiny'}",
        "train.max_steps=2",
        "serve.feedback.store_text=true",
        "serve.feedback.poll_s=0.2",
        "learn.min_feedback=8",
        "learn.epochs=1",
        "learn.max_steps=2",
        "learn.margin=-100",
        "learn.max_old_drop=1",
    ]
    return train_run(load_recipe(work / "tiny.yaml", overrides))


@pytest.mark.slow  # serves a run and trains a challenger in the server's child process
def test_served_run_learns_on_a_schedule_without_a_failed_request(run_dir):
    import httpx
    from serve_helpers import Server

    server = Server(str(run_dir), "--learn", "--learn-every", "1s", "--set", "serve.num_threads=1")
    statuses: list = []
    versions: list[str] = []
    done = threading.Event()

    async def client(k: int, c: httpx.AsyncClient):
        i = 0
        while not done.is_set():
            i += 1
            try:
                r = await c.post("/v1/classify", json={"input": [f"the tram was splendid number {k}.{i}"]})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    fb = await c.post("/v1/feedback", json={"response_id": r.json()["id"], "label": "pos"})
                    statuses.append(fb.status_code)
                    versions.append(fb.json().get("model_version"))
            except httpx.HTTPError as e:
                statuses.append(type(e).__name__)
            await asyncio.sleep(0.05)

    def watch():
        end = time.monotonic() + 300
        decisions = run_dir / "learn" / "decisions"
        try:
            while time.monotonic() < end:
                if versions and versions[-1] != "base":
                    n = len(versions)
                    while len(versions) < n + 8 and time.monotonic() < end:
                        time.sleep(0.05)
                    return
                if decisions.is_dir() and any(
                    json.loads(p.read_text())["action"] in ("refused", "failed") for p in decisions.glob("*.json")
                ):
                    return
                time.sleep(0.1)
        finally:
            done.set()

    async def main():
        watcher = asyncio.get_running_loop().run_in_executor(None, watch)
        async with httpx.AsyncClient(
            base_url=server.url, timeout=60, limits=httpx.Limits(max_keepalive_connections=0)
        ) as c:
            await asyncio.gather(*(client(k, c) for k in range(4)))
        await watcher

    try:
        asyncio.run(main())
    finally:
        server.stop()
    counts = {s: statuses.count(s) for s in set(statuses)}
    decisions = [json.loads(p.read_text()) for p in sorted((run_dir / "learn" / "decisions").glob("*.json"))]
    assert set(statuses) == {200}, (counts, server.log[-3000:])
    assert decisions and decisions[0]["action"] == "promoted", (decisions, server.log[-3000:])
    assert versions[0] == "base" and versions[-1] == decisions[0]["challenger"]  # the promoted version answers
    assert "learn round" in server.log
