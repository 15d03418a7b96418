"""The report's curation section (recipe ``data.curate``): rows per split before and after each step, duplicates
found, PII replaced per type, label issues with their suggested labels. Reads RUN/splits/curate.json.

Every string from the data is escaped: a text that holds markup is shown as text, never rendered."""

from __future__ import annotations

import html
from pathlib import Path

from keel.report.parts import read_json
from keel.rundir import SPLITS

STEP_NAMES = {
    "pii": "PII scrubbing (every split)",
    "quality": "quality filters",
    "exact": "exact duplicates",
    "near": "near duplicates (MinHash LSH)",
    "contamination": "near duplicates of validation / test rows",
    "label_errors": "label errors (confident learning)",
}
SPLIT_NAMES = ("train", "validation", "test")


def _e(v) -> str:
    return html.escape(str(v))


def _table(head: list[str], rows: list[list]) -> str:
    return (
        "<table><tr>"
        + "".join(f"<th>{_e(h)}</th>" for h in head)
        + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in rows)
        + "</table>"
    )


def _n(v) -> str:
    return f"{v:,}"


def section_curation(run_dir: Path, ctx: dict) -> str | None:
    doc = read_json(Path(run_dir) / SPLITS / "curate.json")
    if not doc:
        return None
    out = [
        "<h2>Data curation</h2>",
        "<p>Rows per split before and after each step of <code>data.curate</code> "
        "(only the training split loses rows; validation and test are never cut).</p>",
    ]
    rows = [["source split", *(_n(doc["before"][s]) for s in SPLIT_NAMES), ""]]
    for step in doc["steps"]:
        what = step.get("removed")
        detail = (
            f"{_n(step['changed'])} rows changed"
            if "changed" in step
            else f"{_n(step['found'])} found, {step['action']}"
            if "found" in step
            else f"{_n(what)} removed"
        )
        rows.append([STEP_NAMES.get(step["step"], step["step"]), *(_n(step["after"][s]) for s in SPLIT_NAMES), detail])
    out.append(_table(["after step", *SPLIT_NAMES, ""], rows))

    pii = doc.get("pii")
    if pii:
        counts = [[kind, _n(n)] for kind, n in pii["counts"].items()]
        out.append(
            f"<h3>PII</h3><p>{_n(sum(pii['counts'].values()))} values replaced by typed placeholders in "
            f"{_n(pii['rows_changed'])} rows, with Presidio's pattern recognizers. "
            f"<b>Not scrubbed:</b> {_e(', '.join(pii['not_scrubbed']))}: they need a named-entity model that keel "
            "does not have offline.</p>" + _table(["type", "replaced"], counts)
        )
        if pii["examples"]:
            out.append(
                "<p>Scrubbed examples:</p><ul>" + "".join(f"<li>{_e(t)}</li>" for t in pii["examples"]) + "</ul>"
            )

    quality = doc.get("quality")
    if quality:
        out.append(
            f"<h3>Quality filters</h3><p>{_n(quality['dropped'])} training rows dropped; texts failing each rule (a "
            "text may fail several):</p>" + _table(["rule", "texts"], [[k, _n(v)] for k, v in quality["rules"].items()])
        )
        if quality["examples"]:
            out.append(
                _table(["dropped text", "rules"], [[x["text"], ", ".join(x["rules"])] for x in quality["examples"]])
            )

    dedup = doc.get("dedup")
    if dedup:
        found = ", ".join(f"{dedup[k]:,} {k}" for k in ("exact", "near", "contamination") if k in dedup)
        out.append(f"<h3>Duplicates</h3><p>Removed from training: {_e(found)}.</p>")
        if dedup["examples"]:
            out.append(
                _table(
                    ["kind", "removed (training)", "duplicate of", "similarity"],
                    [[x["kind"], x["removed"], x["kept"], f"{x['similarity']:.3f}"] for x in dedup["examples"]],
                )
            )

    errors = doc.get("label_errors")
    if errors:
        if "skipped" in errors:
            out.append(f"<h3>Label errors</h3><p>Not searched: {_e(errors['skipped'])}.</p>")
        else:
            action = {
                "flag": "flagged only (training used the given labels)",
                "drop": "dropped from training",
                "relabel": "relabelled with the suggested label",
            }[errors["action"]]
            out.append(
                f"<h3>Label errors</h3><p>{_n(errors['found'])} suspected label errors, {_e(action)}: confident "
                f"learning (Northcutt et al. 2021) on {errors['folds']}-fold out-of-fold probabilities of a logistic "
                f"regression on {_e(errors['features'])} features.</p>"
            )
            if errors["examples"]:
                out.append(
                    _table(
                        ["text", "given label", "suggested label", "probability of suggested"],
                        [[x["text"], x["given"], x["suggested"], f"{x['confidence']:.3f}"] for x in errors["examples"]],
                    )
                )
    return "".join(out)
