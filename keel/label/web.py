"""The web page of `keel label --web`: one text and a button per label, served on loopback only.

No script and no external asset: plain HTML forms and inline CSS, sent with a Content-Security-Policy that allows
nothing else. Every string from the pool or the run is HTML-escaped. A POST must carry the session's random token
and a loopback Host header, so another web page open in the same browser cannot label on the person's behalf.
"""

from __future__ import annotations

import html
import logging
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

from keel.label.session import Session

logger = logging.getLogger(__name__)

MAX_BODY = 4096
CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
CSS = """
body{font:16px/1.5 system-ui,sans-serif;max-width:760px;margin:2em auto;padding:0 1em;color:#1d2330}
.text{white-space:pre-wrap;font-size:1.15em;background:#f5f6fa;padding:1em;border-radius:6px}
button{font-size:1em;margin:.3em .4em .3em 0;padding:.5em 1em;border:1px solid #99a;border-radius:5px;background:#fff}
button.label{background:#e8f0fe} .sub{color:#667}
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def page(session: Session, token: str) -> str:
    row = session.current()
    head = (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>keel label</title>"
        f"<style>{CSS}</style></head><body><h1>keel label</h1>"
        f"<p class=sub>{len(session.answers)} labels stored in {_esc(session.store.name)}</p>"
    )
    if row is None:
        return (
            head
            + "<p id=done>Done: every round is labelled (or the pool is empty). You can close this tab.</p></body></html>"
        )
    buttons = "".join(
        f"<button class=label type=submit name=label value='{_esc(name)}'>{_esc(name)}</button>"
        for name in session.labels
    )
    return (
        head + f"<p class=sub>round {session.round + 1} of {session.rounds}, {len(session.batch)} left in this batch; "
        f"pool row {row}; the model guesses {_esc(session.prediction(row))} (uncertainty {session.score(row):.3f})</p>"
        f"<p class=text id=text>{_esc(session.texts[row])}</p>"
        f"<form method=post action=/label><input type=hidden name=row value={row}>"
        f"<input type=hidden name=token value='{_esc(token)}'>{buttons}"
        f"<button type=submit name=skip value=1>skip</button></form></body></html>"
    )


def make_server(session: Session, port: int = 0) -> ThreadingHTTPServer:
    """A server on 127.0.0.1 (``port`` 0: a free one); ``server.finished`` is set once the session is over."""
    token = secrets.token_urlsafe(16)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        server_version = "keel-label"
        sys_version = ""

        def log_message(self, *args) -> None:  # no request lines (and no texts) in the log
            pass

        def _send(self, status: int, body: str = "", location: str | None = None) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Security-Policy", CSP)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("Cache-Control", "no-store")
            if location:
                self.send_header("Location", location)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _local(self) -> bool:
            port = self.server.server_address[1]
            return self.headers.get("Host") in (f"127.0.0.1:{port}", f"localhost:{port}")

        def do_GET(self) -> None:
            if not self._local():
                return self._send(403, "<p>forbidden: open the page at the 127.0.0.1 address keel printed</p>")
            if self.path == "/favicon.ico":  # browsers ask; no icon, and no error in their console
                return self._send(204)
            if self.path != "/":
                return self._send(404, "<p>not found</p>")
            with lock:
                self._send(200, page(session, token))

        def do_POST(self) -> None:
            if not self._local() or self.path != "/label":
                return self._send(403 if not self._local() else 404, "<p>no</p>")
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:
                return self._send(413, "<p>request too large</p>")
            form = parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
            if not secrets.compare_digest(form.get("token", [""])[0], token):
                return self._send(403, "<p>this page is out of date; reload it</p>")
            with lock:
                try:
                    row = int(form.get("row", [""])[0])
                except ValueError:
                    return self._send(400, "<p>bad row</p>")
                label = None if "skip" in form else form.get("label", [None])[0]
                if row != session.current():  # a second tab, or the back button: never label the wrong text
                    return self._send(303, location="/")
                if label is not None and label not in session.labels:
                    return self._send(400, "<p>unknown label</p>")
                session.answer(row, label)
                if session.done:
                    self.server.finished.set()
            self._send(303, location="/")

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.finished = threading.Event()
    return server


def serve(session: Session, port: int = 0) -> None:
    """Serve until the session is over or Ctrl-C."""
    server = make_server(session, port)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    logger.info(f"label: open {url} in a browser on this machine; Ctrl-C to stop (labels are saved as you go)")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        while not server.finished.wait(0.5):
            pass
        logger.info("label: every round is labelled")
        time.sleep(1.0)  # the browser's redirect to the closing page still gets an answer
    except KeyboardInterrupt:
        logger.info("label: stopped; the labels given so far are stored")
    finally:
        server.shutdown()
        server.server_close()
