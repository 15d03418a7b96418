"""The report's learning section: the decisions of `keel learn` as a table and a per-round SVG plot, and the curves
benchmarks/drift.py --run leaves in RUN/learn/simulation.json."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

from keel.report.learn import SIMULATION, section_learn

SVG_NS = "{http://www.w3.org/2000/svg}"


def _plots(page: str) -> list[ET.Element]:
    """Every inline <svg> of the section, parsed as XML (so an unescaped string would fail here)."""
    return [ET.fromstring(m) for m in re.findall(r"<svg\b.*?</svg>", page, flags=re.S)]


def _points(svg: ET.Element) -> dict[str, int]:
    """Legend label -> number of points drawn, per series; checks each polyline has as many vertices as circles."""
    out = {}
    for g in svg.iter(f"{SVG_NS}g"):
        circles = g.findall(f"{SVG_NS}circle")
        vertices = g.find(f"{SVG_NS}polyline").get("points").split()
        assert len(vertices) == len(circles)
        out[g.find(f"{SVG_NS}text").text] = len(circles)
    return out


def _decision(folder, n: int, **fields) -> None:
    (folder / f"{n:04d}.json").write_text(json.dumps({"round": n, **fields}))


def test_decisions_plot_one_point_per_judged_round_and_escape_their_strings(tmp_path):
    folder = tmp_path / "learn" / "decisions"
    folder.mkdir(parents=True)
    figures = {
        "new": {"champion": 0.5, "challenger": 0.8, "n": 4},
        "old": {"champion": 0.7, "challenger": 0.65, "n": 10},
    }
    _decision(folder, 1, action="promoted", champion="base", challenger="v0001", figures=figures, why="<b>gain</b>")
    figures2 = {"new": {"champion": 0.8, "challenger": 0.9, "n": 4}, "old": {"champion": None, "challenger": 0.6}}
    _decision(folder, 2, action="refused <script>", champion="v0001", challenger="v<0002>", figures=figures2, why="x")
    _decision(folder, 3, action="skipped", champion="v0001", why="2 usable label feedback texts")  # no figures
    page = section_learn(tmp_path, {})
    assert "<script>" not in page and "<0002>" not in page and "<b>gain" not in page
    assert "refused &lt;script&gt;" in page and "v&lt;0002&gt;" in page  # in the table and in the points' tooltips
    (plot,) = _plots(page)
    assert _points(plot) == {
        "new data: challenger": 2,
        "new data: champion": 2,
        "old data: challenger": 2,
        "old data: champion": 1,  # round 2's champion was not measured on the old data: no point
    }
    tips = [t.text for t in plot.iter(f"{SVG_NS}title")]
    assert "round 2: v<0002> (refused <script>) 0.9000" in tips  # unescaped again by the XML parser: the same text
    ticks = {t.text for t in plot.iter(f"{SVG_NS}text")}
    assert {"1", "2"} <= ticks and "3" not in ticks  # the skipped round is no point on the x axis


def test_simulated_drift_curves_show_without_decisions(tmp_path):
    assert section_learn(tmp_path, {}) is None
    rows = [
        {"round": r, "version": f"v{r}", "old_test_accuracy": 0.6, "new_slice_accuracy": 0.3 + r / 10} for r in range(3)
    ]
    sim = {
        "topic": "<g>oogle",
        "rounds": 2,
        "per_round": 10,
        "model": "tiny-bert",
        "arms": {"replay": rows, "no-replay": rows[:2]},
    }
    (tmp_path / "learn").mkdir()
    (tmp_path / "learn" / SIMULATION).write_text(json.dumps(sim))
    page = section_learn(tmp_path, {})
    assert "Simulated drift" in page and "&#x27;&lt;g&gt;oogle&#x27;" in page and "<g>oogle" not in page
    (plot,) = _plots(page)
    assert _points(plot) == {
        "replay: new slice": 3,
        "replay: old test": 3,
        "no-replay: new slice": 2,
        "no-replay: old test": 2,
    }
