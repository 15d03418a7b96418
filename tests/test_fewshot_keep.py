"""`keel fewshot` keeps the old labels: the trained head's rows stay bit for bit, the old labels' validation
accuracy drops at most fewshot.max_old_drop (else nothing is written), a new label is still recognised."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from test_fewshot import build_source_run

from keel.fewshot.support import read_support

SUPPORT = """text,label
the train was late again,delay
my flight left two hours late,delay
the bus came late today,delay
our plane landed late at night,delay
where is my refund,refund
I want my refund now,refund
still no refund for my ticket,refund
please refund my money,refund
the ride was lovely indeed,pos
"""


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    run_dir, support = build_source_run(tmp_path_factory.mktemp("fewshot-keep"))
    support.write_text(SUPPORT)  # four rows per new label: each can be held out and told from the others
    return run_dir, support


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """`keel ARGS` in this process, as main() runs it: (exit code, stdout + stderr)."""
    from keel.cli import main

    monkeypatch.setattr(logging.getLogger("keel"), "propagate", True)  # the CLI's root callback turns it off
    monkeypatch.setattr(sys, "argv", ["keel", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    if capsys is None:
        return code, ""
    out = capsys.readouterr()
    return code, out.out + out.err


def head(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(str(Path(run_dir) / "model" / "model.safetensors"))
    return state["classifier.weight"], state["classifier.bias"]


def old_validation(run_dir: Path) -> tuple[list[str], list[str]]:
    from keel.data.splits import load_frozen

    val = load_frozen(run_dir).validation
    return val["text"].astype(str).tolist(), val["label"].astype(str).tolist()


def accuracy(run_dir, texts: list[str], labels: list[str]) -> float:
    from keel.evaluate import predict

    return sum(p["label"] == y for p, y in zip(predict(run_dir, texts), labels)) / len(labels)


@pytest.fixture(scope="module")
def added(source_run, tmp_path_factory):
    """The new run `keel fewshot RUN --support FILE` writes (in-process main(), once for the module)."""
    run_dir, support = source_run
    new = tmp_path_factory.mktemp("out") / "with-delays"
    mp, buffer = pytest.MonkeyPatch(), io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):  # capsys is per test; rich writes to the sys.stdout of the moment
            code, _ = cli(mp, None, "fewshot", str(run_dir), "--support", str(support), f"fewshot.output_dir={new}")
    finally:
        mp.undo()
    assert code == 0, buffer.getvalue()
    return new, buffer.getvalue()


def test_the_trained_rows_are_kept_bit_for_bit_and_one_row_is_appended_per_new_label(source_run, added):
    run_dir, _ = source_run
    new, _ = added
    w0, b0 = head(run_dir)
    w1, b1 = head(new)
    assert w1.shape == (4, w0.shape[1]) and b1.shape == (4,)
    assert torch.equal(w1[:2], w0) and torch.equal(b1[:2], b0)  # the old labels' rows, bit for bit
    result = json.loads((new / "fewshot.json").read_text())
    assert result["labels"] == ["neg", "pos", "delay", "refund"] and result["old_rows"] == "kept"
    # the appended rows are on the old rows' scale (a multiple of their mean norm from the scales tried)
    norm = float(w0.norm(dim=1).mean())
    for row, name in zip(w1[2:], ["delay", "refund"]):
        assert float(row.norm()) == pytest.approx(result["head"][name]["scale"] * norm, rel=1e-4)


def test_old_labels_keep_their_validation_accuracy_within_the_gate(source_run, added):
    run_dir, _ = source_run
    new, _ = added
    texts, labels = old_validation(run_dir)
    before, after = accuracy(run_dir, texts, labels), accuracy(new, texts, labels)
    assert after >= before - 0.02  # fewshot.max_old_drop's default
    val = json.loads((new / "fewshot.json").read_text())["old_validation"]
    assert val["rows"] == len(texts) and val["max_old_drop"] == 0.02
    assert val["accuracy_before"] == pytest.approx(before, abs=1e-4)
    assert val["accuracy_after"] == pytest.approx(after, abs=1e-4)


def test_an_old_text_keeps_its_probabilities(source_run, added):
    from keel.serve.engines import load_engine

    run_dir, _ = source_run
    new, _ = added
    texts, _ = old_validation(run_dir)
    old = load_engine(str(run_dir)).classify(texts[:4])
    now = load_engine(str(new)).classify(texts[:4])
    for a, b in zip(old, now):
        assert b["label"] == a["label"]
        # the old rows' logits are unchanged: the odds between old labels are too, and a new row can only take
        # probability away from them (the trained head's confidence, never a blown-up 1.000)
        assert b["scores"]["neg"] / b["scores"]["pos"] == pytest.approx(
            a["scores"]["neg"] / a["scores"]["pos"], rel=1e-3
        )
        assert b["score"] <= a["score"] + 1e-6


def test_a_new_label_is_predicted_on_its_own_support_texts(source_run, added):
    from keel.evaluate import predict

    _, support = source_run
    new, text = added
    rows = [(x, y) for x, y in zip(*read_support(support, "text", "label")) if y in ("delay", "refund")]
    picked = [p["label"] for p in predict(new, [x for x, _ in rows])]
    assert picked == [y for _, y in rows]
    result = json.loads((new / "fewshot.json").read_text())
    assert set(result["new_held_out"]) == {"delay", "refund"}
    assert all(0.0 <= v <= 1.0 for v in result["new_held_out"].values())
    assert (
        "validation rows: accuracy" in text and "new label delay: accuracy on its support rows, each held out" in text
    )


def test_keel_ui_shows_the_old_labels_accuracy_and_the_new_labels(added):
    from keel.ui.runs import summary

    new, _ = added
    result = json.loads((new / "fewshot.json").read_text())
    found = dict(summary(new)["headline"])
    assert found["old-label test accuracy"] == result["old_test"]["accuracy_after"]
    assert found["new labels (held-out accuracy)"] == ", ".join(
        f"{n} ({result['new_held_out'][n]:.2f})" for n in ["delay", "refund"]
    )


def _copies_of_validation_rows(run_dir: Path, path: Path, flip: bool) -> Path:
    """A support file of validation texts the run classifies correctly: as a new label 'dup' (recognising any of them
    takes a validation row from the old labels), or (``flip``) under the other old label, plus one 'dup' row."""
    import csv

    from keel.evaluate import predict

    texts, labels = old_validation(run_dir)
    right = [(x, y) for x, y, p in zip(texts, labels, predict(run_dir, texts)) if p["label"] == y]
    assert len(right) >= 5
    other = {"neg": "pos", "pos": "neg"}
    rows = (
        [[x, other[y]] for x, y in right[:4]] + [[right[4][0], "dup"]] if flip else [[x, "dup"] for x, _ in right[:4]]
    )
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


@pytest.mark.parametrize(
    "extra, says",
    [
        ([], "none of its 4 support rows (each held out) is recognised without the old labels' validation accuracy"),
        (  # setfit retrains the encoder and refits every row: here on rows that contradict the validation split
            ["fewshot.method=setfit", "fewshot.contrastive.max_pairs=16", "fewshot.old_examples=4"],
            "raise fewshot.old_examples",
        ),
    ],
)
def test_the_gate_refuses_in_one_line_and_writes_nothing(source_run, tmp_path, monkeypatch, capsys, extra, says):
    run_dir, _ = source_run
    support = _copies_of_validation_rows(run_dir, tmp_path / "dup.csv", flip=bool(extra))
    listing = sorted(p.name for p in run_dir.parent.iterdir())
    code, text = cli(monkeypatch, capsys, "fewshot", str(run_dir), "--support", str(support), *extra)
    assert code == 2, text
    line = " ".join(text.split())
    assert says in line and "fewshot.max_old_drop" in line and "Traceback" not in text
    assert len([x for x in text.splitlines() if x.startswith("error:")]) == 1
    assert sorted(p.name for p in run_dir.parent.iterdir()) == listing  # no run, no temporary folder


def test_max_old_drop_is_checked_by_the_recipe(source_run):
    from keel.errors import RecipeError
    from keel.recipe import load_recipe

    run_dir, _ = source_run
    with pytest.raises(RecipeError, match="fewshot.max_old_drop"):
        load_recipe(run_dir / "recipe.yaml", ["fewshot.max_old_drop=1.5"])
