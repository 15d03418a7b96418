"""`POST /v1/feedback`: a correct label, a thumbs up/down, or a preference between two choices, about an earlier
response, stored append-only in RUN/feedback/feedback.sqlite beside the model version that served it.

The server remembers its last ``serve.feedback.remember`` responses (id -> model version, input and output hashes,
and their texts when ``serve.feedback.store_text`` is set) in memory; feedback names one of them. The database is
SQLite in WAL mode with ``synchronous=FULL``: a 200 is sent only after the row's transaction is committed and the
WAL synced, so nothing acknowledged is lost on a crash. One writer thread commits whatever rows are waiting in one
transaction (a group commit: one fsync for many clients). Triggers refuse UPDATE and DELETE.

Not covered: streamed generations carry an id but are not remembered (no feedback on them); a server restart
forgets the responses before it (feedback on them is 404).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import queue
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path

from keel.serve import protocol as P
from keel.serve.errors import ServeError

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    response_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    route TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('label', 'thumbs', 'preference')),
    model_version TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    input_text TEXT,
    input_sha256 TEXT NOT NULL,
    output_text TEXT,
    output_sha256 TEXT,
    rejected_text TEXT,
    rejected_sha256 TEXT,
    served_label TEXT,
    label TEXT,
    thumbs TEXT CHECK (thumbs IS NULL OR thumbs IN ('up', 'down'))
);
CREATE TRIGGER IF NOT EXISTS feedback_no_update BEFORE UPDATE ON feedback
BEGIN SELECT RAISE(ABORT, 'feedback is append-only'); END;
CREATE TRIGGER IF NOT EXISTS feedback_no_delete BEFORE DELETE ON feedback
BEGIN SELECT RAISE(ABORT, 'feedback is append-only'); END;
"""
COLUMNS = (
    "created",
    "response_id",
    "idx",
    "route",
    "kind",
    "model_version",
    "model_sha256",
    "input_text",
    "input_sha256",
    "output_text",
    "output_sha256",
    "rejected_text",
    "rejected_sha256",
    "served_label",
    "label",
    "thumbs",
)
MAX_GROUP = 512  # rows in one commit at most


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    """A connection to the feedback database (created with its schema unless ``readonly``)."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # the WAL is synced at every commit: a 200 means on disk
        conn.executescript(SCHEMA)
    conn.row_factory = sqlite3.Row
    return conn


def read_rows(path: Path, after: int = 0, kind: str | None = None) -> list[dict]:
    """The rows with id > ``after`` (of ``kind``, if given), oldest first; [] when there is no database."""
    if not Path(path).is_file():
        return []
    conn = connect(Path(path), readonly=True)
    try:
        sql, args = "SELECT * FROM feedback WHERE id > ?", [after]
        if kind:
            sql, args = sql + " AND kind = ?", [after, kind]
        return [dict(r) for r in conn.execute(sql + " ORDER BY id", args)]
    finally:
        conn.close()


def count_rows(path: Path, after: int, kinds: tuple[str, ...]) -> tuple[int, int]:
    """(how many rows of ``kinds`` have id > ``after``, the newest such id or ``after``); (0, after) without a
    database."""
    if not Path(path).is_file():
        return 0, after
    conn = connect(Path(path), readonly=True)
    try:
        marks = ", ".join("?" * len(kinds))
        n, last = conn.execute(
            f"SELECT COUNT(*), MAX(id) FROM feedback WHERE id > ? AND kind IN ({marks})", [after, *kinds]
        ).fetchone()
        return int(n), int(last or after)
    finally:
        conn.close()


class FeedbackStore:
    """``await store.append(row)`` -> the row's id, once committed and synced (a group commit on one thread)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.conn = connect(self.path)
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._writer, name="keel-feedback", daemon=True)
        self.thread.start()

    async def append(self, row: dict) -> int:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.jobs.put((row, loop, done))
        return await done

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)
        self.conn.close()

    def _writer(self) -> None:
        insert = f"INSERT INTO feedback ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        while True:
            job = self.jobs.get()
            if job is None:
                return
            group = [job]
            while len(group) < MAX_GROUP:
                try:
                    nxt = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.jobs.put(None)  # stop after this group
                    break
                group.append(nxt)
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                ids = [self.conn.execute(insert, [row.get(c) for c in COLUMNS]).lastrowid for row, _, _ in group]
                self.conn.execute("COMMIT")
            except Exception as e:  # the client hears 500 (its row is not stored), the log the reason
                logger.exception("feedback: could not store %d row(s)", len(group))
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                for _, loop, fut in group:
                    loop.call_soon_threadsafe(_settle, fut, None, e)
                continue
            for (_, loop, fut), rowid in zip(group, ids):
                loop.call_soon_threadsafe(_settle, fut, rowid, None)


def _settle(fut, result, error) -> None:
    if fut.done():  # the client left
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class ResponseLog:
    """The last ``size`` responses: id -> what feedback on them needs (texts only with ``store_text``)."""

    def __init__(self, size: int, store_text: bool):
        self.size, self.store_text = size, store_text
        self.entries: OrderedDict[str, dict] = OrderedDict()
        self.lock = threading.Lock()

    def add(self, response_id: str, route: str, version: str, model_sha256: str, items: list[dict]) -> None:
        """``items``: per data index (classify) or choice (generation), ``{"input": str, "output": str}``
        (classify adds ``"label"``, the served one, and the ``"version"``/``"model_sha256"`` that computed it: a
        request's texts may be split across batches, and a swap may fall between them). Texts are kept only when the
        recipe allows it."""
        kept = [
            {
                "input_sha256": sha256_text(it["input"]),
                "output_sha256": sha256_text(it["output"]),
                "input_text": it["input"] if self.store_text else None,
                "output_text": it["output"] if self.store_text else None,
                "label": it.get("label"),
                "version": it.get("version", version),
                "model_sha256": it.get("model_sha256", model_sha256),
            }
            for it in items
        ]
        entry = {"route": route, "version": version, "model_sha256": model_sha256, "items": kept}
        with self.lock:
            self.entries[response_id] = entry
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)

    def get(self, response_id: str) -> dict | None:
        with self.lock:
            return self.entries.get(response_id)


def feedback_row(body, entry: dict, labels: list[str]) -> dict:
    """The database row for a feedback request about ``entry``; ServeError naming the field when it does not fit."""

    items, route = entry["items"], entry["route"]
    kinds = [k for k in ("label", "thumbs", "preference") if getattr(body, k) is not None]
    if len(kinds) != 1:
        raise ServeError(
            400,
            "send exactly one of label, thumbs or preference" + (f"; got {' and '.join(kinds)}" if kinds else ""),
            kinds[1] if len(kinds) > 1 else "label",
            "invalid_value",
        )
    kind = kinds[0]
    row = {
        "created": time.time(),
        "response_id": body.response_id,
        "route": route,
        "kind": kind,
    }
    if kind == "preference":
        chosen, rejected = body.preference.chosen, body.preference.rejected
        for name, i in (("chosen", chosen), ("rejected", rejected)):
            if i >= len(items):
                raise ServeError(
                    400,
                    f"preference.{name} is {i}, but response {body.response_id} has {len(items)} choice(s) "
                    "(ask for n >= 2 to compare two)",
                    f"preference.{name}",
                    "invalid_value",
                )
        if chosen == rejected:
            raise ServeError(
                400, "preference.chosen and preference.rejected must differ", "preference", "invalid_value"
            )
        a, b = items[chosen], items[rejected]
        row.update(model_version=a["version"], model_sha256=a["model_sha256"])
        if a["input_sha256"] != b["input_sha256"]:
            raise ServeError(400, "a preference compares two choices of the same prompt", "preference", "invalid_value")
        row.update(idx=chosen, input_text=a["input_text"], input_sha256=a["input_sha256"])
        row.update(output_text=a["output_text"], output_sha256=a["output_sha256"])
        row.update(rejected_text=b["output_text"], rejected_sha256=b["output_sha256"])
        return row
    if body.index >= len(items):
        raise ServeError(
            400,
            f"index is {body.index}, but response {body.response_id} has {len(items)} item(s)",
            "index",
            "invalid_value",
        )
    item = items[body.index]
    row.update(model_version=item["version"], model_sha256=item["model_sha256"])
    row.update(idx=body.index, input_text=item["input_text"], input_sha256=item["input_sha256"])
    row.update(output_text=item["output_text"], output_sha256=item["output_sha256"], served_label=item["label"])
    if kind == "label":
        if route != "classify":
            raise ServeError(400, "label feedback is for /v1/classify responses; send thumbs or preference", "label")
        if body.label not in labels:
            raise ServeError(
                400,
                f"label '{body.label}' is not one of the model's labels ({', '.join(labels)})",
                "label",
                "invalid_value",
            )
        row["label"] = body.label
    else:
        row["thumbs"] = body.thumbs
    return row


def add_feedback_routes(app, state, errors: dict) -> None:
    @app.post(
        "/v1/feedback",
        response_model=P.FeedbackResponse,
        tags=["keel"],
        responses=errors,
        summary="a correct label, a thumbs up/down or a preference about an earlier response (stored durably)",
    )
    async def feedback(body: P.FeedbackRequest):
        if state.feedback is None:
            raise ServeError(400, state.feedback_off, None, "feedback_off")
        entry = state.responses.get(body.response_id)
        if entry is None:
            raise ServeError(
                404,
                f"no response {body.response_id} here: feedback names the id of one of this server's last "
                f"{state.responses.size} responses (serve.feedback.remember), before any restart",
                "response_id",
                "response_not_found",
            )
        row = feedback_row(body, entry, state.engine.labels)
        rowid = await state.feedback.append(row)
        return P.FeedbackResponse(
            id=f"fb-{rowid}", response_id=body.response_id, kind=row["kind"], model_version=row["model_version"]
        )
