import json

import pandas as pd
import pytest

from keel.data.load import check_data_config, load_splits, read_eval_file
from keel.errors import DataError, RecipeError
from keel.recipe import DataConfig


def cfg(**kw):
    return DataConfig(**kw)


@pytest.fixture
def frame():
    return pd.DataFrame(
        {
            "review": [f"text number {i}" for i in range(100)],
            "stars": ["good" if i % 3 else "bad" for i in range(100)],
            "city": ["a" if i % 2 else "b" for i in range(100)],
        }
    )


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_user_files_with_column_mapping(tmp_path, frame, suffix):
    path = tmp_path / f"d{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    s = load_splits(
        cfg(path=str(path), columns={"text": "review", "label": "stars", "group": "city"}), "classification"
    )
    assert s.labels == ["bad", "good"]
    assert len(s.train) + len(s.validation) + len(s.test) == 100
    assert len(s.test) == 10 and len(s.validation) == 10
    assert set(s.train.columns) == {"text", "label", "group"}
    # no text in two splits
    assert not set(s.train.text) & set(s.test.text) and not set(s.train.text) & set(s.validation.text)
    # `keel validate` (and train/run before making a run directory) finds a wrong column without reading the rows
    with pytest.raises(DataError, match="column 'body' is not in .*review, stars, city"):
        check_data_config(cfg(path=str(path), columns={"text": "body", "label": "stars"}), "classification")


def test_split_is_deterministic_and_seeded(tmp_path, frame):
    path = tmp_path / "d.csv"
    frame.to_csv(path, index=False)
    c = dict(path=str(path), columns={"text": "review", "label": "stars"})
    a, b = load_splits(cfg(**c), "classification"), load_splits(cfg(**c), "classification")
    assert a.test.text.tolist() == b.test.text.tolist()
    other = load_splits(cfg(**c, split={"seed": 1}), "classification")
    assert other.test.text.tolist() != a.test.text.tolist()
    # stratified: both labels in the test split in about the data's proportion
    assert 2 <= (a.test.label == "bad").sum() <= 5


def test_dedup_and_empty_rows(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "same text,a\n" * 5 + ",b\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(40)))
    s = load_splits(cfg(path=str(path)), "classification")
    total = len(s.train) + len(s.validation) + len(s.test)
    assert total == 41
    assert any("repeated" in n for n in s.notes) and any("empty" in n for n in s.notes)


@pytest.mark.parametrize(
    "content, kw, message",
    [
        (None, {}, "not found"),
        ("text,label\nhello,a\n", {"columns": {"text": "body"}}, "data.columns.text: column 'body' is not in"),
        ("text,label\n", {}, "no usable rows"),
        ("text,label\n" + "x{},a\n" * 20, {}, "single label"),
        ("text,label\n" + "".join(f"x{i},{'abc'[i % 3]}\n" for i in range(30)), {"labels": ["a", "b"]}, "label 'c'"),
    ],
)
def test_bad_data_gets_one_clear_line(tmp_path, content, kw, message):
    path = tmp_path / "d.csv"
    if content is not None:
        path.write_text(content.replace("x{}", "x") if "{}" in content else content)
    if "x,a" in (content or ""):  # 20 rows of one label, made distinct
        path.write_text("text,label\n" + "".join(f"x{i},a\n" for i in range(20)))
    with pytest.raises(DataError) as e:
        load_splits(cfg(path=str(path), **kw), "classification")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_builtin_is_named():
    with pytest.raises(RecipeError, match="unknown data set 'tweets'"):
        load_splits(cfg(name="tweets"), "classification")


def test_builtin_sets_load():
    s = load_splits(cfg(name="tweets-sentiment", max_train_samples=50, max_eval_samples=20), "classification")
    assert s.labels == ["negative", "neutral", "positive"] and len(s.train) == 50 and len(s.test) == 20
    c = load_splits(cfg(name="crows-pairs"), "classification")
    assert len(c.labels) == 9 and "group" in c.train.columns
    sh = load_splits(cfg(name="shakespeare"), "causal-lm")
    assert len(sh.train) + len(sh.validation) + len(sh.test) == 38


def test_eval_file_rejects_unseen_label(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{i}", "label": lab}) for i, lab in enumerate(["a", "b", "zzz"])))
    with pytest.raises(DataError, match="label 'zzz'.*not one the model knows"):
        read_eval_file(str(path), {"text": "text", "label": "label"}, ["a", "b"])


def test_tokenized_cache_is_reused(tmp_path, toy_csv, capsys):
    from transformers import AutoTokenizer

    from keel.data.prepare import prepare_data
    from keel.models import model_dir
    from keel.recipe import validate_recipe

    recipe = validate_recipe({"data": {"path": str(toy_csv)}, "model": {"name": "tiny-bert", "max_length": 16}})
    tok = AutoTokenizer.from_pretrained(model_dir("tiny-bert"))
    from keel.data import prepare

    first = prepare_data(recipe, tok)
    second = prepare_data(recipe, tok)
    assert not first.cache_hit and second.cache_hit
    assert (
        "reusing tokenized cache" not in capsys.readouterr().err
    )  # this process said it tokenized them: once is enough
    prepare._ANNOUNCED.clear()  # as in a new process
    assert prepare_data(recipe, tok).cache_hit
    assert "reusing tokenized cache" in capsys.readouterr().err
    assert second.splits["train"]["input_ids"] == first.splits["train"]["input_ids"]
    assert max(len(x) for x in first.splits["train"]["input_ids"]) <= 16
    # a different setting is a different cache entry
    third = prepare_data(recipe.model_copy(update={"model": recipe.model.model_copy(update={"max_length": 12})}), tok)
    assert not third.cache_hit
    # editing the file changes its content hash: no stale cache
    toy_csv.write_text(toy_csv.read_text().replace("number 1,", "number one,"))
    assert not prepare_data(recipe, tok).cache_hit


def test_evaluation_scores_in_length_order_but_returns_dataset_order():
    """Evaluation batches rows of similar length; each row's logits still land on its own row."""
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    from keel.models import model_dir
    from keel.tasks.classification import build_model, collate, predict_logits

    tok = AutoTokenizer.from_pretrained(model_dir("tiny-bert"))
    texts = [" ".join(["word"] * (1 + (7 * i) % 13)) + f" {i}" for i in range(24)]  # lengths out of order
    test = Dataset.from_dict({**tok(texts), "label": [i % 2 for i in range(24)]})
    torch.manual_seed(0)
    model = build_model(model_dir("tiny-bert"), ["neg", "pos"]).eval()
    batched = predict_logits(model, test, tok, 5, torch.device("cpu"))
    with torch.no_grad():
        alone = np.concatenate(
            [
                model(**{k: v for k, v in collate(test[i : i + 1], tok).items() if k != "labels"}).logits.numpy()
                for i in range(len(test))
            ]
        )
    assert batched.shape == (24, 2)
    np.testing.assert_allclose(batched, alone, atol=1e-5)


@pytest.mark.slow
def test_later_stages_read_the_splits_frozen_at_training_time(tmp_path):
    """eval and report use RUN_DIR/splits: an edited, then moved source changes nothing, from any folder."""
    from conftest import TINY_RECIPE, keel, write_toy_csv

    work, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    csv = write_toy_csv(work / "toy.csv", n=100)
    (work / "r.yaml").write_text(TINY_RECIPE.format(data="toy.csv", epochs=1, every=0))  # relative to the project
    keel("train", "r.yaml", cwd=work, check=True)
    run_dir = work / "runs" / "tiny"
    frozen = {s: pd.read_parquet(run_dir / "splits" / f"{s}.parquet") for s in ("train", "validation", "test")}
    assert [len(f) for f in frozen.values()] == [60, 20, 20]
    assert not set(frozen["train"]["text"]) & set(frozen["test"]["text"])
    before = json.loads(keel("eval", "runs/tiny", "--json", cwd=work, check=True).stdout)

    lines = csv.read_text().splitlines()  # the source is edited (rows reordered, more rows), then moved away
    csv.write_text("\n".join([lines[0], *reversed(lines[1:]), "an added row was great number 1000,pos"]) + "\n")
    csv.rename(work / "moved.csv")
    after = json.loads(keel("eval", str(run_dir), "--json", cwd=elsewhere, check=True).stdout)
    assert [after[k] for k in ("n", "loss", "confusion")] == [before[k] for k in ("n", "loss", "confusion")]
    keel("report", str(run_dir), cwd=elsewhere, check=True)
    page = (run_dir / "report.html").read_text()
    assert "<h2>Data</h2>" in page and "could not be built" not in page

    (run_dir / "splits" / "test.parquet").write_bytes((run_dir / "splits" / "test.parquet").read_bytes() + b"x")
    proc = keel("eval", str(run_dir), cwd=elsewhere)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "checksum mismatch" in proc.stderr and "test.parquet" in proc.stderr


def test_a_run_without_frozen_splits_refuses_a_changed_source(tmp_path, toy_csv):
    """Runs from before frozen splits re-split their source only if it is the file they were trained on."""
    from transformers import AutoTokenizer

    from keel.data.prepare import prepare_data
    from keel.io import sha256_file
    from keel.models import model_dir
    from keel.recipe import validate_recipe

    recipe = validate_recipe({"data": {"path": str(toy_csv)}, "model": {"name": "tiny-bert", "max_length": 16}})
    tok = AutoTokenizer.from_pretrained(model_dir("tiny-bert"))
    run_dir = tmp_path / "old-run"
    run_dir.mkdir()
    (run_dir / "train.json").write_text(json.dumps({"data": {"content_sha256": sha256_file(toy_csv)}}))
    assert len(prepare_data(recipe, tok, run_dir).splits["test"]) > 0  # unchanged: re-split, the same rows
    assert not (run_dir / "splits").exists()  # nothing is written into a finished run
    toy_csv.write_text(toy_csv.read_text().replace("number 1,", "number one,"))
    with pytest.raises(DataError, match="cannot be shown to be the one it was trained on"):
        prepare_data(recipe, tok, run_dir)


def test_training_freezes_once_and_a_resume_warns_about_a_changed_source(tmp_path, toy_csv, capsys):
    from transformers import AutoTokenizer

    from keel.data.prepare import prepare_data
    from keel.models import model_dir
    from keel.recipe import validate_recipe

    recipe = validate_recipe({"data": {"path": str(toy_csv)}, "model": {"name": "tiny-bert", "max_length": 16}})
    tok = AutoTokenizer.from_pretrained(model_dir("tiny-bert"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = prepare_data(recipe, tok, run_dir, freeze=True)
    assert (run_dir / "splits" / "manifest.json").is_file()
    toy_csv.write_text("text,label\n" + "".join(f"a new text {i},{'ab'[i % 2]}\n" for i in range(50)))
    capsys.readouterr()
    resumed = prepare_data(recipe, tok, run_dir, freeze=True)
    assert "changed since this run froze its splits" in capsys.readouterr().err
    later = prepare_data(recipe, tok, run_dir)  # eval, audit, ...: the frozen rows, no warning needed
    assert "changed since" not in capsys.readouterr().err
    for got in (resumed, later):
        assert got.splits["test"]["text"] == first.splits["test"]["text"]
        assert got.splits["train"]["input_ids"] == first.splits["train"]["input_ids"]
