"""The feedback database (append-only SQLite, group commit), the response log and the feedback rules, in process."""

from __future__ import annotations

import asyncio
import sqlite3
from types import SimpleNamespace

import pytest

from keel.learn.data import heldout_share, label_feedback
from keel.serve.errors import ServeError
from keel.serve.feedback import FeedbackStore, ResponseLog, connect, feedback_row, read_rows, sha256_text

LABELS = ["neg", "pos"]


def _row(i: int, **extra) -> dict:
    base = {
        "created": 0.0,
        "response_id": f"clf-{i}",
        "idx": 0,
        "route": "classify",
        "kind": "label",
        "model_version": "base",
        "model_sha256": "ab" * 32,
        "input_text": f"text {i}",
        "input_sha256": sha256_text(f"text {i}"),
        "label": "pos",
    }
    return base | extra


def test_concurrent_appends_are_all_committed_with_distinct_ids(tmp_path):
    db = tmp_path / "feedback" / "feedback.sqlite"
    store = FeedbackStore(db)

    async def main():
        return await asyncio.gather(*(store.append(_row(i)) for i in range(300)))

    ids = asyncio.run(main())
    store.close()
    assert len(set(ids)) == 300
    rows = read_rows(db)  # a fresh, read-only connection sees every acknowledged row
    assert sorted(r["id"] for r in rows) == sorted(ids)
    assert {r["response_id"] for r in rows} == {f"clf-{i}" for i in range(300)}
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_the_table_is_append_only(tmp_path):
    db = tmp_path / "f.sqlite"
    store = FeedbackStore(db)
    asyncio.run(store.append(_row(1)))
    store.close()
    conn = connect(db)
    for sql in ("UPDATE feedback SET label = 'neg'", "DELETE FROM feedback"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute(sql)
    assert [r["label"] for r in conn.execute("SELECT label FROM feedback")] == ["pos"]
    conn.close()


def test_a_failed_commit_fails_its_requests_and_the_writer_goes_on(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite")

    async def main():
        with pytest.raises(sqlite3.IntegrityError):
            await store.append(_row(1, kind="bogus"))  # the CHECK constraint refuses it
        return await store.append(_row(2))

    assert asyncio.run(main()) >= 1
    store.close()
    assert [r["response_id"] for r in read_rows(tmp_path / "f.sqlite")] == ["clf-2"]


def test_the_response_log_keeps_texts_only_when_allowed_and_forgets_the_oldest():
    hashed = ResponseLog(2, store_text=False)
    hashed.add("a", "classify", "base", "s", [{"input": "hello", "output": "pos", "label": "pos"}])
    item = hashed.get("a")["items"][0]
    assert item["input_text"] is None and item["output_text"] is None
    assert item["input_sha256"] == sha256_text("hello")
    hashed.add("b", "classify", "base", "s", [{"input": "x", "output": "neg"}])
    hashed.add("c", "classify", "base", "s", [{"input": "y", "output": "neg"}])
    assert hashed.get("a") is None and hashed.get("c") is not None
    kept = ResponseLog(2, store_text=True)
    kept.add("a", "classify", "v0001", "s", [{"input": "hello", "output": "pos", "version": "v0002"}])
    assert kept.get("a")["items"][0]["input_text"] == "hello"
    assert kept.get("a")["items"][0]["version"] == "v0002"  # the batch that computed it, not the response's first


def _body(**kw):
    fields = {"response_id": "r", "index": 0, "label": None, "thumbs": None, "preference": None}
    return SimpleNamespace(**(fields | kw))


def test_feedback_rows_name_what_does_not_fit():
    log = ResponseLog(10, store_text=True)
    log.add("r", "classify", "base", "sha", [{"input": "t", "output": "neg", "label": "neg"}])
    entry = log.get("r")
    row = feedback_row(_body(label="pos"), entry, LABELS)
    assert (row["kind"], row["label"], row["served_label"], row["input_text"]) == ("label", "pos", "neg", "t")
    assert row["model_version"] == "base" and row["model_sha256"] == "sha"
    cases = [
        (_body(), "label"),
        (_body(label="pos", thumbs="up"), "thumbs"),
        (_body(label="meh"), "label"),
        (_body(label="pos", index=1), "index"),
        (_body(preference=SimpleNamespace(chosen=0, rejected=1)), "preference.rejected"),
    ]
    for body, param in cases:
        with pytest.raises(ServeError) as e:
            feedback_row(body, entry, LABELS)
        assert e.value.status == 400 and e.value.param == param, (body, e.value.message)
    chat = ResponseLog(10, store_text=False)
    chat.add("c", "chat", "base", "sha", [{"input": "p", "output": "one"}, {"input": "p", "output": "two"}])
    pref = feedback_row(_body(preference=SimpleNamespace(chosen=1, rejected=0)), chat.get("c"), [])
    assert pref["output_sha256"] == sha256_text("two") and pref["rejected_sha256"] == sha256_text("one")
    assert pref["output_text"] is None
    with pytest.raises(ServeError, match="for /v1/classify"):
        feedback_row(_body(label="pos"), chat.get("c"), LABELS)


def test_label_feedback_keeps_the_latest_label_and_a_stable_holdout():
    rows = [
        _row(i, id=i + 1, input_text=f"text {i % 40}", input_sha256=sha256_text(f"text {i % 40}")) for i in range(80)
    ]
    rows[-1]["label"] = "neg"  # text 39 corrected again: the later label wins
    fb = label_feedback(rows, LABELS, holdout=0.25)
    assert len(fb.train) + len(fb.heldout) == 40 and fb.last_id == 80
    both = dict(zip(fb.train["text"], fb.train["label"])) | dict(zip(fb.heldout["text"], fb.heldout["label"]))
    assert both["text 39"] == "neg"
    held = {t for t in fb.heldout["text"]}
    assert held == {f"text {i}" for i in range(40) if heldout_share(sha256_text(f"text {i}")) < 0.25}
    assert 0 < len(held) < 40
    again = label_feedback(list(reversed(rows))[:40], LABELS, holdout=0.25)  # another round: same texts held out
    assert set(again.heldout["text"]) <= held


def test_label_feedback_without_texts_says_how_to_keep_them():
    rows = [_row(i, id=i + 1, input_text=None) for i in range(5)]
    with pytest.raises(Exception, match="serve.feedback.store_text: true"):
        label_feedback(rows, LABELS, holdout=0.25)
    mixed = label_feedback([*rows, _row(8, id=8), _row(9, id=9, label="other")], LABELS, 0.25)  # some usable
    assert mixed.unusable == {"no_text": 5, "unknown_label": 1} and len(mixed.train) + len(mixed.heldout) == 1
