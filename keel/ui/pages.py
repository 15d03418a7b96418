"""The console's HTML: one layout, inline CSS (and, on the chat page, one inline script) carrying the response's CSP
nonce; no external asset. Every string from a run, a recipe, a label or a chat goes through ``e`` (HTML-escaped);
plots are inline SVG from keel/ui/compare.py and keel/report."""

from __future__ import annotations

import html
import math
from urllib.parse import quote

CSS = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#1d2330;background:#fbfbfd}
nav{background:#1d2330;padding:.6em 1.2em} nav a{color:#fff;margin-right:1.4em;text-decoration:none;font-weight:600}
main{max-width:1100px;margin:1.2em auto;padding:0 1em} h1{font-size:1.5em;margin:.3em 0}
h2{font-size:1.15em;border-bottom:1px solid #dde;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;background:#fff} td,th{padding:.3em .7em;border-bottom:1px solid #eef;
text-align:left;vertical-align:top} th{background:#f1f2f7} td.num{text-align:right;font-variant-numeric:tabular-nums}
.sub{color:#667} pre{background:#f1f2f7;padding:.8em;overflow:auto;font-size:13px;max-height:36em}
.badge{padding:.1em .5em;border-radius:.8em;font-size:.85em;font-weight:600}
.done{background:#e6f4ea;color:#137333} .failed{background:#fce8e6;color:#b3261e}
.running{background:#e8f0fe;color:#1a56c4} .stopped,.unknown{background:#fef7e0;color:#8a5a00}
svg{max-width:100%;height:auto;background:#fff} iframe{width:100%;height:70vh;border:1px solid #dde;background:#fff}
.add{color:#137333} .del{color:#b3261e} .hunk{color:#667} button{font:inherit;padding:.35em 1em}
textarea{width:100%;font:inherit} .msg{white-space:pre-wrap;padding:.5em .8em;margin:.4em 0;border-radius:6px}
.user{background:#e8f0fe} .assistant{background:#f1f2f7} .error{background:#fce8e6;color:#b3261e}
"""

CHAT_JS = """
const form = document.getElementById('chat'), log = document.getElementById('log');
const history = [];
function show(role, text) {
  const p = document.createElement('p');
  p.className = 'msg ' + role;
  p.textContent = text;
  log.appendChild(p);
  return p;
}
async function send(text) {
  history.push({role: 'user', content: text});
  show('user', text);
  const body = {messages: history, max_tokens: Number(document.getElementById('max_tokens').value) || 64};
  const r = await fetch('/api/chat', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                      body: JSON.stringify(body)});
  const answer = await r.json();
  if (!r.ok) { history.pop(); show('error', answer.error); throw new Error(answer.error); }
  history.push({role: 'assistant', content: answer.reply});
  show('assistant', answer.reply).dataset.model = answer.model;
  return answer.reply;
}
form.addEventListener('submit', (ev) => {
  ev.preventDefault();
  const box = document.getElementById('prompt');
  const text = box.value.trim();
  if (!text) return;
  box.value = '';
  send(text).catch(() => {});
});
window.keel = {ready: true, send};
"""


def e(value) -> str:
    """Any outside string as HTML text (quotes too, so it is safe in an attribute)."""
    return html.escape("" if value is None else str(value), quote=True)


def cell(v) -> str:
    """A value as a person reads it: 4 places for scores, separators for big numbers, a dash for not recorded."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.4f}"
    return e(v)


def run_href(name: str, sub: str = "") -> str:
    return f"/run/{quote(name, safe='')}{sub}"


def layout(title: str, body: str, nonce: str, script: str = "") -> str:
    js = f"<script nonce='{nonce}'>{script}</script>" if script else ""
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{e(title)} · keel ui</title>"
        f"<meta name=viewport content='width=device-width,initial-scale=1'><link rel=icon href='data:,'>"
        f"<style nonce='{nonce}'>{CSS}</style></head><body><nav><a href='/'>keel runs</a><a href='/chat'>chat</a>"
        f"</nav><main>{body}</main>{js}</body></html>"
    )


def _badge(status: str, detail: str = "") -> str:
    return f"<span class='badge {e(status)}' title='{e(detail)}'>{e(status)}</span>"


def _headline(run: dict) -> str:
    return "<br>".join(f"{e(k)} <b>{cell(v)}</b>" for k, v in run["headline"]) or "–"


def runs_page(runs: list[dict], root: str, nonce: str) -> str:
    if not runs:
        body = (
            f"<h1>Runs</h1><p>No runs in <code>{e(root)}</code> yet. <code>make demo</code> (or "
            "<code>keel quickstart</code>) trains one into <code>runs/quickstart</code>; "
            "<code>keel run RECIPE</code> makes more.</p>"
        )
        return layout("runs", body, nonce)
    rows = []
    for r in runs:
        pick = r["deployable"]
        if pick and isinstance((r.get("deployable_test") or {}).get("accuracy"), float):
            pick = f"{pick} (test accuracy {r['deployable_test']['accuracy']:.4f})"
        rows.append(
            f"<tr><td><input type=checkbox name=run value='{e(r['name'])}' aria-label='compare {e(r['name'])}'></td>"
            f"<td><a href='{e(run_href(r['name']))}'>{e(r['name'])}</a></td><td>{e(r['task'] or '–')}</td>"
            f"<td>{e(r['model'] or '–')}</td><td>{_badge(r['status'], r['status_detail'])}</td>"
            f"<td>{e(r['started'].replace('T', ' ')[:16] or '–')}</td><td>{_headline(r)}</td><td>{e(pick or '–')}</td>"
            + (
                f"<td><a href='{e(run_href(r['name'], '/report'))}'>report</a></td>"
                if r["has_report"]
                else "<td>–</td>"
            )
            + "</tr>"
        )
    body = (
        f"<h1>Runs</h1><p class=sub>{len(runs)} in <code>{e(root)}</code>, newest first. Tick two or more to compare "
        "them.</p><form method=get action='/compare'><table><tr><th></th><th>run</th><th>task</th><th>model</th>"
        "<th>status</th><th>started</th><th>headline</th><th>deployable variant</th><th></th></tr>"
        + "".join(rows)
        + "</table><button type=submit>compare</button></form>"
    )
    return layout("runs", body, nonce)


def _pairs_table(pairs: list[tuple[str, object]]) -> str:
    shown = [(k, v) for k, v in pairs if v is not None]
    return "<table>" + "".join(f"<tr><th>{e(k)}</th><td>{cell(v)}</td></tr>" for k, v in shown) + "</table>"


def run_page(run: dict, path: str, curves: str | None, nonce: str) -> str:
    train, test, pick = run.get("train") or {}, run.get("test") or {}, run.get("pick") or {}
    facts = [
        ("task", run["task"]),
        ("model", run["model"]),
        ("started", run["started"] or None),
        ("wall time (s)", run.get("wall_seconds")),
        *run["headline"],
        ("majority-class test accuracy", (test.get("baseline") or {}).get("accuracy")),
        ("optimiser steps", train.get("steps")),
        ("training samples/s", train.get("samples_per_second")),
        ("peak memory (MB)", train.get("peak_rss_mb")),
        ("deployable variant", pick.get("deployable")),
        ("deployable test accuracy", (pick.get("test") or {}).get("accuracy")),
        ("epsilon spent", (run.get("privacy") or {}).get("epsilon")),
        ("model version served (keel learn)", (run.get("learn") or {}).get("current")),
    ]
    name = run["name"]
    parts = [
        f"<h1>{e(name)}</h1><p>{_badge(run['status'], run['status_detail'])} <span class=sub>"
        f"{e(run['status_detail'])}</span></p>",
        "<h2>Headline figures</h2>" + _pairs_table(facts),
        f"<p><a href='/compare?runs={e(quote(name, safe=''))}'>compare with others</a> (tick runs on the "
        "<a href='/'>runs list</a>)</p>",
    ]
    if curves:
        parts.append("<h2>Training curves</h2>" + curves)
    if run["has_labels"]:
        parts.append(
            f"<h2>Labelling</h2><p>This run has active-learning labels: <a href='{e(run_href(name, '/labels'))}'>"
            "the labelling page</a>.</p>"
        )
    if run["has_report"]:
        parts.append(
            f"<h2>Report</h2><p><a href='{e(run_href(name, '/report'))}'>open the report alone</a></p>"
            f"<iframe sandbox title='report of {e(name)}' src='{e(run_href(name, '/report'))}'></iframe>"
        )
    else:
        parts.append(f"<h2>Report</h2><p>No report.html yet: <code>keel report {e(path)}</code> writes it.</p>")
    parts.append(f"<h2>Recipe</h2><pre id=recipe>{e(run['recipe_text'])}</pre>")
    return layout(name, "".join(parts), nonce)


def _diff_html(lines: list[str]) -> str:
    out = []
    for line in lines:
        cls = "hunk" if line.startswith("@@") else "add" if line.startswith("+") else "del" if line[:1] == "-" else ""
        out.append(f"<span class='{cls}'>{e(line)}</span>" if cls else e(line))
    return "<pre class=diff>" + "\n".join(out) + "</pre>"


def compare_page(runs: list[dict], data: dict, nonce: str) -> str:
    head = "<tr><th></th>" + "".join(f"<th><a href='{e(run_href(r['name']))}'>{e(r['name'])}</a></th>" for r in runs)
    head += "</tr>"
    body = [
        f"<h1>Comparing {len(runs)} runs</h1><h2>Metrics</h2><table id=metrics>{head}"
        + "".join(
            f"<tr><th>{e(k)}</th>" + "".join(f"<td class=num>{cell(v)}</td>" for v in vs) + "</tr>"
            for k, vs in data["metrics"]
        )
        + "</table>"
    ]
    body.append("<h2>Fairness</h2>")
    rows = [
        (f"{attr}: {what}", [((g.get(attr) or {}).get(key)) for g in data["fairness"]])
        for attr in sorted({a for g in data["fairness"] for a in g})
        for what, key in (("demographic parity difference", "dp"), ("equalized odds difference", "eo"))
    ]
    rows = [(k, vs) for k, vs in rows if any(v is not None for v in vs)]  # measured in at least one run
    if not rows and any(data["fairness"]):
        body.append("<p>Differences not measured: no attribute has two groups large enough to rank.</p>")
    if rows:
        body.append(
            f"<table>{head}"
            + "".join(
                f"<tr><th>{e(k)}</th>" + "".join(f"<td class=num>{cell(v)}</td>" for v in vs) + "</tr>"
                for k, vs in rows
            )
            + "</table>"
        )
    body.append(
        data["fairness_svg"] + "<p class=sub>pale, hatched bars: groups too small to rank.</p>"
        if data["fairness_svg"]
        else "<p>None of these runs has a fairness audit (<code>audit.fairness</code> in the recipe).</p>"
    )
    body.append("<h2>Compression: Pareto fronts</h2>")
    body.append(
        data["pareto_svg"]
        or "<p>None of these runs measured its variants (<code>keel compress</code> or <code>keel bench</code>).</p>"
    )
    body.append("<h2>Privacy spent</h2><table>")
    body.append(
        "<tr><th>run</th><th>epsilon</th><th>target epsilon</th><th>delta</th><th>noise multiplier</th>"
        "<th>sampling rate</th><th>steps</th><th>accountant</th></tr>"
    )
    for p in data["privacy"]:
        if not p["dp"]:
            body.append(f"<tr><td>{e(p['run'])}</td><td colspan=7>trained without differential privacy</td></tr>")
            continue
        keys = ("epsilon", "target_epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "accountant")
        body.append(f"<tr><td>{e(p['run'])}</td>" + "".join(f"<td class=num>{cell(p[k])}</td>" for k in keys) + "</tr>")
    body.append("</table><h2>Recipe diff</h2>")
    for (a, b), lines in data["diffs"]:
        what = _diff_html(lines) if lines else "<p>the two recipes are the same.</p>"
        body.append(f"<h3>{e(a)} → {e(b)}</h3>{what}")
    return layout("compare", "".join(body), nonce)


def chat_page(serve_url: str, models: list[str] | None, problem: str | None, nonce: str) -> str:
    if problem:
        state = f"<p class='msg error' id=serve-state>{e(problem)}</p>"
    else:
        state = (
            f"<p class=sub id=serve-state>talking to {e(', '.join(models or []) or 'the model')} at {e(serve_url)}</p>"
        )
    body = (
        f"<h1>Chat</h1>{state}<p class=sub>Messages go through this console to <code>keel serve</code>'s "
        "<code>/v1/chat/completions</code> (the key, if any, stays on the server side).</p><div id=log></div>"
        "<form id=chat><textarea id=prompt rows=3 placeholder='say something' aria-label=message></textarea>"
        "<p><label>max tokens <input id=max_tokens type=number min=1 max=2048 value=64></label> "
        "<button type=submit id=send>send</button></p></form>"
    )
    return layout("chat", body, nonce, CHAT_JS)


def labels_page(
    name: str, path: str, sessions: list[dict], curve: str | None, nonce: str, live: str | None = None
) -> str:
    parts = [f"<h1>Labels of <a href='{e(run_href(name))}'>{e(name)}</a></h1>"]
    if live:  # keel label --web serves its own page (a session token, no script) at the address it printed
        parts.append(
            f"<p class='msg user'>A labelling session is open now: <code>{e(live)}</code>; its page is at the "
            "127.0.0.1 address that command printed. Reload this page to see the labels it stores.</p>"
        )
    if not sessions:
        parts.append("<p>No labelling session yet.</p>")
    for s in sessions:
        counts = ", ".join(f"{e(k)}: {v:,}" for k, v in sorted(s["counts"].items())) or "none"
        parts.append(f"<h2>{e(s['name'])}</h2><p>{s['labels']:,} texts labelled ({counts}).</p>")
        if s["recent"]:
            parts.append(
                "<table><tr><th>label</th><th>text (latest first)</th></tr>"
                + "".join(f"<tr><td>{e(x['label'])}</td><td>{e(x['text'])}</td></tr>" for x in s["recent"])
                + "</table>"
            )
    if curve:
        parts.append("<h2>Probe accuracy per round</h2>" + curve)
    parts.append(
        f"<h2>Label more</h2><p>In a terminal: <code>keel label {e(path)} --pool POOL_FILE --web</code> opens the "
        "labelling page (its own loopback page with a session token); the labels land beside these, append-only.</p>"
    )
    return layout(f"labels of {name}", "".join(parts), nonce)


def login_page(nonce: str, failed: bool = False) -> str:
    note = "<p class='msg error'>that key is not one of the console's keys</p>" if failed else ""
    body = (
        f"<h1>Sign in</h1>{note}<p>This console needs one of its API keys ($KEEL_API_KEYS or --api-key-file).</p>"
        "<form method=post action='/login'><input type=password name=key aria-label='API key' autocomplete=off> "
        "<button type=submit>sign in</button></form>"
    )
    return layout("sign in", body, nonce)


def error_page(status: int, message: str, nonce: str) -> str:
    return layout(str(status), f"<h1>{status}</h1><p>{e(message)}</p><p><a href='/'>all runs</a></p>", nonce)
