"""keel label: a session over a pool (strategies, append-only store, retraining), its terminal loop and web page,
the page also in headless Chromium driven over the DevTools protocol (a small websocket client; Playwright is not
a keel dependency), skipped when Chromium is not installed."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import pytest

from keel.errors import DataError

EVIL = "<script>alert(1)</script> & <img src=x onerror=alert(2)> \"quoted\" 'single'"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, keel_cache):
    """A tiny classification run (one optimiser step: the session only needs a model and frozen splits)."""
    from conftest import TINY_RECIPE, write_toy_csv

    from keel.pipeline import train_run
    from keel.recipe import load_recipe

    work = tmp_path_factory.mktemp("label")
    data = write_toy_csv(work / "toy.csv")
    recipe = work / "tiny.yaml"
    recipe.write_text(TINY_RECIPE.format(data=data, epochs=1, every=0))
    run_dir = train_run(load_recipe(recipe, ["train.max_steps=1", f"output.dir={work / 'runs' / 'tiny'}"]))
    return work, run_dir


@pytest.fixture
def pool(tmp_path):
    path = tmp_path / "pool.csv"
    rows = [f"the bus was {'lovely' if i % 2 else 'awful'} on day {i}" for i in range(12)]
    rows[3] = EVIL
    # the note differs per test, so each test's pool (and so its store in the shared run) is its own
    quoted = [t.replace('"', '""') for t in rows]
    path.write_text("text,note\n" + "".join(f'"{t}",{tmp_path.name}\n' for t in quoted))
    return path


def _session(run_dir, pool, **kw):
    from keel.label.session import Session

    return Session(run_dir, pool, **{"batch_size": 3, "rounds": 2, **kw})


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_terminal_answers_are_stored_append_only_and_the_probe_is_retrained_per_round(trained, pool):
    from keel.label.terminal import run_terminal

    _, run_dir = trained
    s = _session(run_dir, pool)
    replies = iter(["1", "what", "s", "pos", "2", "neg", "1"])
    shown = []
    given = run_terminal(s, ask=lambda _: next(replies), write=shown.append)
    assert given == 5 and s.current() is None  # 2 rounds x 3, one skipped (and a skip is not a label)
    stored = _lines(s.store)
    assert [e["label"] for e in stored] == ["neg", "pos", "pos", "neg", "neg"]
    assert all(e["text"] == s.texts[e["row"]] for e in stored) and len({e["row"] for e in stored}) == 5
    assert any("type a number" in line for line in shown)
    rounds = _lines(s.rounds_file)
    assert [r["labels"] for r in rounds] == [0, 2, 5]  # before any label, then after each round
    # a new session on the same pool resumes: stored rows are not asked again; a later answer appends, never rewrites
    again = _session(run_dir, pool, rounds=1)
    assert set(again.answers) == {e["row"] for e in stored}
    row = again.current()
    assert row not in again.answers
    before = s.store.read_bytes()
    again.answer(row, "pos")
    assert s.store.read_bytes().startswith(before)


def test_the_strategy_decides_what_is_asked(trained, pool):
    _, run_dir = trained
    s = _session(run_dir, pool, strategy="least-confidence")
    import numpy as np

    open_rows = [i for i in range(len(s.texts)) if i not in s.answers]
    want = max(open_rows, key=lambda i: 1 - s.probs[i].max())
    assert np.isclose(1 - s.probs[s.current()].max(), 1 - s.probs[want].max())


@pytest.mark.parametrize("strategy", ["badge", "typiclust"])
def test_the_embedding_strategies_ask_a_batch_of_distinct_open_rows(trained, pool, strategy):
    _, run_dir = trained
    s = _session(run_dir, pool, strategy=strategy)
    assert s.current() is not None
    assert len(set(s.batch)) == len(s.batch) == 3 and not set(s.batch) & set(s.answers)


def test_a_pool_without_the_text_column_is_one_line(trained, tmp_path):
    _, run_dir = trained
    bad = tmp_path / "pool.csv"
    bad.write_text("body,note\nhello,1\n")
    with pytest.raises(DataError) as e:
        _session(run_dir, bad)
    msg = str(e.value)
    assert "\n" not in msg and "has no column 'text' (columns: body, note)" in msg and "--text-column" in msg
    assert _session(run_dir, bad, text_column="body").texts == ["hello"]


def test_a_torn_last_line_is_ignored_and_the_next_answer_starts_its_own_line(trained, pool, caplog):
    _, run_dir = trained
    s = _session(run_dir, pool)
    row = s.current()
    s.answer(row, "neg")
    with open(s.store, "a") as f:
        f.write('{"row": 5, "text": "cut mid-wri')  # a power cut mid-write
    caplog.set_level("WARNING", logger="keel.label.session")
    t = _session(run_dir, pool)
    assert "not a complete label entry" in caplog.text and set(t.answers) == {row}
    nxt = t.current()
    t.answer(nxt, "pos")
    assert {e["row"] for e in _lines_tolerant(s.store)} == {row, nxt}


def _lines_tolerant(path):
    out = []
    for x in path.read_text().splitlines():
        try:
            out.append(json.loads(x))
        except ValueError:
            pass
    return out


# -- the web page ------------------------------------------------------------------------------------------


@pytest.fixture
def server(trained, pool):
    from keel.label.web import make_server

    _, run_dir = trained
    s = _session(run_dir, pool, strategy="random", batch_size=12, rounds=1)
    s.batch = [3, *[i for i in range(12) if i != 3]]  # the hostile text first
    srv = make_server(s)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield s, srv
    srv.shutdown()
    srv.server_close()


def _request(srv, method, path, body=None, host=None):
    port = srv.server_address[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Host": host or f"127.0.0.1:{port}"}
    if body is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    return r.status, dict(r.getheaders()), r.read().decode()


def test_the_page_escapes_pool_text_and_allows_no_script_or_outside_asset(server):
    s, srv = server
    status, headers, body = _request(srv, "GET", "/")
    assert status == 200 and srv.server_address[0] == "127.0.0.1"
    assert "<script" not in body and "<img" not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body and "&quot;quoted&quot;" in body
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert not re.search(r"(src|href)=['\"]?https?:", body)


def test_a_label_needs_the_session_token_and_a_loopback_host(server):
    s, srv = server
    _, _, body = _request(srv, "GET", "/")
    token = re.search(r"name=token value='([^']+)'", body).group(1)
    form = urllib.parse.urlencode({"row": 3, "token": "wrong", "label": "pos"})
    assert _request(srv, "POST", "/label", form)[0] == 403
    good = urllib.parse.urlencode({"row": 3, "token": token, "label": "pos"})
    assert _request(srv, "POST", "/label", good, host="evil.example:80")[0] == 403
    assert _request(srv, "GET", "/", host="evil.example:80")[0] == 403  # DNS rebinding
    assert not s.store.exists() or not _lines(s.store)
    assert _request(srv, "POST", "/label", good)[0] == 303
    assert [(e["row"], e["label"]) for e in _lines(s.store)] == [(3, "pos")]
    assert _request(srv, "POST", "/label", good)[0] == 303  # a stale form (row 3 is done): nothing stored twice
    assert len(_lines(s.store)) == 1
    bad = urllib.parse.urlencode({"row": s.current(), "token": token, "label": "maybe"})
    assert _request(srv, "POST", "/label", bad)[0] == 400


# -- in a real browser ---------------------------------------------------------------------------------------


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """Just enough of the Chrome DevTools protocol: send a command, wait for its answer."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws, self.next_id = connect(ws_url, max_size=None, open_timeout=30), 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait(self, expression: str, timeout: float = 60):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {expression}")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_a_person_labels_in_headless_chromium(trained, pool, tmp_path):
    from keel.label.web import make_server

    _, run_dir = trained
    s = _session(run_dir, pool, strategy="random", batch_size=2, rounds=1)
    s.batch = [3, 0]  # the hostile text first
    srv = make_server(s)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    profile = tmp_path / "profile"
    browser = subprocess.Popen(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-sync",
            "--disable-background-networking",
            "--disable-component-update",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        end = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()) and time.monotonic() < end:
            time.sleep(0.2)
        devtools_port = int(port_file.read_text().split()[0])
        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{devtools_port}/json/list", timeout=30))
        tab = DevTools(next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"])
        tab.call("Page.navigate", url=f"http://127.0.0.1:{srv.server_address[1]}/")
        shown = tab.wait("document.readyState === 'complete' && document.getElementById('text')?.textContent")
        assert shown == EVIL  # the hostile text is shown as text ...
        assert tab.js("document.querySelectorAll('script, img, iframe').length") == 0  # ... and made no element
        assert tab.js("[...document.querySelectorAll('button.label')].map(b => b.value).join(',')") == ",".join(
            s.labels
        )
        tab.js("document.querySelector(\"button[value='pos']\").click()")
        tab.wait(
            f"document.getElementById('text') && document.getElementById('text').textContent !== {json.dumps(EVIL)}"
        )
        assert [(e["row"], e["label"]) for e in _lines(s.store)] == [(3, "pos")]
        tab.js("document.querySelector(\"button[value='neg']\").click()")
        assert tab.wait("document.getElementById('done')?.textContent").startswith("Done")
        assert [(e["row"], e["label"]) for e in _lines(s.store)] == [(3, "pos"), (0, "neg")]
        assert srv.finished.is_set()
    finally:
        browser.terminate()
        browser.wait(timeout=30)
        srv.shutdown()
        srv.server_close()
