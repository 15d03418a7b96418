"""The report's augmentation, weak-supervision and active-learning sections, from the files their stages write."""

from __future__ import annotations

import json

from keel.report.label import section_augment, section_label, section_weak


def test_sections_show_what_was_measured_and_escape_what_came_from_data(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "data" / "augment.json").write_text(
        json.dumps(
            {
                "train_before": 100,
                "added": 250,
                "per_op": {"synonym": 200, "typo": 50},
                "examples": [{"op": "synonym", "source": "<b>great</b> trip", "copy": "<b>terrific</b> trip"}],
            }
        )
    )
    fns = [
        {"name": "lf_<x>", "coverage": 0.5, "overlaps": 0.25, "conflicts": 0.0, "accuracy": None, "gold_votes": 0},
        {"name": "lf_good", "coverage": 0.2, "overlaps": 0.1, "conflicts": 0.05, "accuracy": 0.8, "gold_votes": 20},
    ]
    (tmp_path / "data" / "weak.json").write_text(
        json.dumps(
            {
                "functions_file": "/x/lfs.py",
                "label_model": "snorkel LabelModel 0.10.0",
                "trained_on": "label model",
                "chosen_by": "auto: validation accuracy 0.810 (label model) vs 0.790 (majority vote; wins a tie)",
                "on_validation": {"majority vote": {"accuracy": 0.79, "coverage": 0.5, "n": 10}},
                "texts": 100,
                "kept": 60,
                "functions": fns,
                "source": "training split",
                "versus_gold": {
                    "majority vote": {"accuracy": 0.7, "coverage": 0.6, "n": 60},
                    "label model": {"accuracy": 0.75, "coverage": 0.6, "n": 60},
                },
            }
        )
    )
    (tmp_path / "labels" / "pool-abc.rounds.jsonl").write_text(
        "\n".join(
            json.dumps({"session": s, "round": r, "labels": n, "validation_accuracy": a, "strategy": "margin"})
            for s, r, n, a in [(1, 0, 0, 0.5), (2, 0, 0, 0.6), (2, 1, 10, 0.7)]
        )
        + "\n{torn"
    )
    aug = section_augment(tmp_path, {})
    assert "250 augmented copies added to the 100 training texts" in aug and "&lt;b&gt;terrific&lt;/b&gt;" in aug
    assert "<b>" not in aug
    weak = section_weak(tmp_path, {})
    assert "lf_&lt;x&gt;" in weak and "50.0%" in weak and "80.0%" in weak and "not measured" in weak
    assert "0.7000" in weak and "0.7500" in weak and "60 texts at least one function voted on" in weak
    assert "chosen: auto: validation accuracy 0.810" in weak and "the validation split&#x27;s labels" in weak
    assert "0.7900" in weak
    label = section_label(tmp_path, {})
    assert "10 labels stored" in label and label.count("<img") == 1  # the latest session only, one plot
    curve = [{"labels": 20, "accuracy": 0.5}, {"labels": 40, "accuracy": 0.6}]
    (tmp_path / "labels" / "simulation.json").write_text(
        json.dumps(
            {
                "curves": {"entropy": curve, "random": curve},
                "seeds": 3,
                "setup": "pool 100",
                "labels_to_match_random": {"entropy": 40, "margin": None},
                "labels_to_match_random_validation": {"entropy": 20, "margin": None},
                "chosen_on_validation": "entropy",
                "probe_c": "3.0",
            }
        )
    )
    label = section_label(tmp_path, {})
    assert label.count("<img") == 2 and "not reached" in label and "<td>40</td>" in label
    assert "chosen there: <b>entropy</b> (probe C 3.0)" in label and "<td>40</td><td>20</td>" in label
    assert section_augment(tmp_path / "none", {}) is None and section_label(tmp_path / "none", {}) is None
