"""data.weak: labelling-function files (user code), Snorkel's analysis and label model, the built-in tweet demo."""

from __future__ import annotations

import numpy as np
import pytest

from keel.data import weak
from keel.errors import DataError
from keel.recipe.label import WeakConfig

LFS = """
def lf_good(text):
    return "pos" if "good" in text else None

def lf_bad(text):
    return "neg" if "bad" in text else None

def helper(text):  # not an lf_: not a labelling function
    return "neg"
"""


def test_functions_are_the_lf_names_in_file_order_and_keel_says_it_imports_them(tmp_path, caplog):
    f = tmp_path / "lfs.py"
    f.write_text(LFS)
    caplog.set_level("INFO", logger="keel.data.weak")
    fns = weak.load_functions(str(f))
    assert [fn.__name__ for fn in fns] == ["lf_good", "lf_bad"]
    assert "importing labelling functions from" in caplog.text and "user code" in caplog.text
    L = weak.apply_functions(fns, ["good day", "bad day", "good and bad", "meh"], ["neg", "pos"])
    assert L.tolist() == [[1, -1], [-1, 0], [1, 0], [-1, -1]]


def test_a_syntax_error_is_one_line_naming_file_and_line_and_runs_nothing(tmp_path):
    f = tmp_path / "lfs.py"
    marker = tmp_path / "ran"
    f.write_text(f"open({str(marker)!r}, 'w')\n\ndef lf_x(text)\n    return None\n")
    with pytest.raises(DataError) as e:
        weak.check_functions(str(f))
    msg = str(e.value)
    assert "\n" not in msg and "lfs.py line 3: syntax error" in msg and "fix the labelling-function file" in msg
    assert not marker.exists()


@pytest.mark.parametrize(
    "source, says",
    [
        ("def helper(t):\n    return None\n", "defines no labelling function"),
        ("raise RuntimeError('boom')\n", "raised RuntimeError: boom"),
        ("def lf_x(t):\n    return 'maybe'\n", "returned 'maybe', which is not a label"),
        ("def lf_x(t):\n    return 1 / 0\n", "lf_x raised ZeroDivisionError"),
    ],
)
def test_bad_functions_are_one_clear_line(tmp_path, source, says):
    f = tmp_path / "lfs.py"
    f.write_text(source)
    with pytest.raises(DataError, match=says) as e:
        weak.apply_functions(weak.load_functions(str(f)), ["a text"], ["neg", "pos"])
    assert "\n" not in str(e.value)


def test_a_missing_or_non_python_file_is_named(tmp_path):
    with pytest.raises(DataError, match="not found"):
        weak.functions_file(str(tmp_path / "nope.py"))
    with pytest.raises(DataError, match="must be a .py file or a built-in set"):
        weak.functions_file("lfs.txt")


def test_analysis_matches_hand_counts():
    # 4 texts x 3 functions; -1 abstains
    L = np.array([[0, 0, -1], [0, 1, -1], [-1, -1, 1], [-1, -1, -1]])
    gold = np.array([0, 1, 1, -1])
    rows = weak.analyse(L, [lambda t: None] * 3, gold)
    assert [r["coverage"] for r in rows] == [0.5, 0.5, 0.25]
    assert [r["overlaps"] for r in rows] == [0.5, 0.5, 0.0]
    assert [r["conflicts"] for r in rows] == [0.25, 0.25, 0.0]
    assert [r["accuracy"] for r in rows] == [0.5, 1.0, 1.0]


def test_the_label_model_learns_to_trust_the_accurate_function_where_majority_vote_cannot():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 1000)
    accs = [0.95, 0.6, 0.6, 0.6, 0.6]  # one good function outvoted by four weak ones
    L = np.stack([np.where(rng.random(len(y)) < a, y, 1 - y) for a in accs], axis=1)
    out = weak.combine(L, 2, epochs=200, seed=0)
    lm, mv = weak.score(out["label_model"], y), weak.score(out["majority"], y)
    assert lm["accuracy"] > mv["accuracy"] + 0.05
    assert out["probs"].shape == (1000, 2)


def test_the_builtin_tweet_functions_beat_chance_against_the_real_labels():
    from keel.data.builtin import DATASETS

    spec = DATASETS["tweets-sentiment"]
    frame = spec.read(spec.paths()).dropna(subset=["text", "sentiment"]).sample(2000, random_state=0)
    labels = ["negative", "neutral", "positive"]
    gold = np.array([labels.index(v) for v in frame["sentiment"]])
    cfg = WeakConfig(functions="tweets-sentiment", epochs=200, label_model="snorkel")
    chosen, summary = weak.weak_labels(frame["text"].astype(str).tolist(), labels, cfg, gold)
    majority_class = np.bincount(gold).max() / len(gold)
    assert len(summary["functions"]) >= 5 and all(f["accuracy"] > 1 / 3 for f in summary["functions"])
    for name in ("majority vote", "label model"):
        assert summary["versus_gold"][name]["accuracy"] > majority_class
    assert summary["kept"] == int((chosen != -1).sum()) > 0.4 * len(gold)


def test_fewer_than_three_functions_need_majority_vote(tmp_path):
    f = tmp_path / "lfs.py"
    f.write_text(LFS)  # two functions
    cfg = WeakConfig(functions=str(f), epochs=10, label_model="snorkel")
    with pytest.raises(DataError, match="needs at least 3 labelling functions; lfs.py has 2.*label_model=majority"):
        weak.weak_labels(["good", "bad"], ["neg", "pos"], cfg)
    cfg.label_model = "majority"
    chosen, summary = weak.weak_labels(["good", "bad", "meh"], ["neg", "pos"], cfg, np.array([1, 0, 0]))
    assert chosen.tolist() == [1, 0, -1] and list(summary["versus_gold"]) == ["majority vote"]


def test_an_unlabelled_file_without_the_text_column_is_one_line_and_gold_is_read_where_present(tmp_path):
    from types import SimpleNamespace

    from keel.recipe import DataConfig

    recipe = SimpleNamespace(data=DataConfig(path=str(tmp_path / "train.csv")), task="classification")
    bad = tmp_path / "u.csv"
    bad.write_text("body\nhello\n")
    with pytest.raises(DataError) as e:
        weak.read_unlabeled(str(bad), recipe, ["neg", "pos"])
    assert "\n" not in str(e.value) and "has no column 'text' (columns: body)" in str(e.value)
    good = tmp_path / "v.csv"
    good.write_text("text,label\ngood day,pos\nbad day,\nmeh,maybe\n")
    texts, gold = weak.read_unlabeled(str(good), recipe, ["neg", "pos"])
    assert texts == ["good day", "bad day", "meh"] and gold.tolist() == [1, -1, -1]


def _planted(rng, n, accs):
    y = rng.integers(0, 2, n)
    return y, np.stack([np.where(rng.random(n) < a, y, 1 - y) for a in accs], axis=1)


def test_auto_trains_on_the_combiner_the_validation_labels_prefer(tmp_path, monkeypatch):
    f = tmp_path / "lfs.py"
    f.write_text(LFS + "\ndef lf_meh(text):\n    return None\n")
    rng = np.random.default_rng(0)
    y_val = rng.integers(0, 2, 50)
    wrong = 1 - y_val

    def fake(lm_val, mv_val):
        def combine(L, *args):
            n = len(L)
            return {
                "probs": np.full((n, 2), 0.5),
                "label_model": np.zeros(n, dtype=np.int64),  # the training labels tell which was chosen
                "majority": np.ones(n, dtype=np.int64),
                "val_label_model": lm_val,
                "val_majority": mv_val,
            }

        return combine

    cfg = WeakConfig(functions=str(f))
    assert cfg.label_model == "auto"
    texts, val = ["good", "bad", "meh"], (["x"] * 50, y_val)
    monkeypatch.setattr(weak, "combine", fake(y_val, wrong))
    chosen, summary = weak.weak_labels(texts, ["neg", "pos"], cfg, val=val)
    assert chosen.tolist() == [0, 0, 0] and summary["trained_on"] == "label model"
    assert summary["on_validation"]["label model"]["accuracy"] == 1.0
    monkeypatch.setattr(weak, "combine", fake(wrong, y_val))
    chosen, summary = weak.weak_labels(texts, ["neg", "pos"], cfg, val=val)
    assert chosen.tolist() == [1, 1, 1] and summary["trained_on"] == "majority vote"
    monkeypatch.setattr(weak, "combine", fake(y_val, y_val))  # a tie: the simpler combiner
    assert weak.weak_labels(texts, ["neg", "pos"], cfg, val=val)[1]["trained_on"] == "majority vote"
    assert "auto: validation accuracy" in summary["chosen_by"]


def test_the_validation_prior_decides_where_the_votes_are_split():
    # two equally good functions that always disagree: the class prior alone settles each text
    L = np.stack([np.zeros(400, dtype=np.int64), np.ones(400, dtype=np.int64), np.full(400, -1)], axis=1)
    for prior, label in (([0.9, 0.1], 0), ([0.1, 0.9], 1)):
        out = weak.combine(L, 2, epochs=50, seed=0, class_balance=prior)
        assert set(out["label_model"].tolist()) == {label}


def test_both_combiners_label_the_validation_texts_and_the_label_model_scores_higher_where_it_should():
    rng = np.random.default_rng(0)
    y, L = _planted(rng, 1200, [0.95, 0.6, 0.6, 0.6, 0.6])
    out = weak.combine(L[:800], 2, epochs=200, seed=0, L_val=L[800:])
    assert out["val_label_model"].shape == (400,) and out["val_majority"].shape == (400,)
    lm, mv = weak.score(out["val_label_model"], y[800:]), weak.score(out["val_majority"], y[800:])
    assert lm["accuracy"] > mv["accuracy"] + 0.05
