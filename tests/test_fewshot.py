"""Few-shot labels: the episodic sampler never leaks, the prototype head is exact, new runs load like any run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_RECIPE, keel, write_toy_csv

from keel.errors import DataError, KeelError
from keel.fewshot.episodes import Episode, EpisodeSampler
from keel.fewshot.heads import (
    embed,
    head_linear,
    logistic_weights,
    prototype_weights,
    prototypes,
    set_head,
    squared_distances,
)
from keel.fewshot.support import read_support
from keel.fewshot.train import contrastive_pairs, episodic_train

# -- the episodic sampler ----------------------------------------------------------------------------------


def leaks(episode: Episode, labels: list[int]) -> list[str]:
    """What is wrong with an episode: a row on both sides, a repeated row, a row of another class, a wrong count."""
    problems = []
    support = [r for rows in episode.support for r in rows]
    query = [r for rows in episode.query for r in rows]
    if set(support) & set(query):
        problems.append(f"rows {sorted(set(support) & set(query))} are in the support and the query set")
    if len(set(support)) < len(support) or len(set(query)) < len(query):
        problems.append("a row is drawn twice on one side")
    for c, s_rows, q_rows in zip(episode.classes, episode.support, episode.query):
        if any(labels[r] != c for r in (*s_rows, *q_rows)):
            problems.append(f"class {c} holds a row of another class")
    if len(set(episode.classes)) < len(episode.classes):
        problems.append("a class is drawn twice")
    return problems


LABELS = [i % 6 for i in range(6 * 12)] + [6] * 3  # six classes of 12 rows, one class too small to take part


def test_sampler_never_puts_a_query_row_in_the_support_set():
    sampler = EpisodeSampler(LABELS, n_way=5, k_shot=5, n_query=7, seed=1)  # 12 rows each: every row is drawn
    seen_classes = set()
    for episode in sampler.episodes(300):
        assert leaks(episode, LABELS) == []
        assert len(episode.classes) == 5
        assert all(len(s) == 5 for s in episode.support) and all(len(q) == 7 for q in episode.query)
        seen_classes |= set(episode.classes)
    assert seen_classes == set(range(6))  # class 6 (3 rows) never takes part


class LeakySampler(EpisodeSampler):
    """A broken sampler: support and query drawn independently from the same rows."""

    def sample(self) -> Episode:
        classes = tuple(self.rng.sample(sorted(self.rows), self.n_way))
        support = tuple(tuple(self.rng.sample(self.rows[c], self.k_shot)) for c in classes)
        query = tuple(tuple(self.rng.sample(self.rows[c], self.n_query)) for c in classes)
        return Episode(classes, support, query)


def test_the_leak_check_catches_a_broken_sampler():
    broken = LeakySampler(LABELS, n_way=5, k_shot=5, n_query=7, seed=1)
    assert any(leaks(e, LABELS) for e in broken.episodes(20))


def test_sampler_refuses_episodes_the_classes_cannot_fill():
    with pytest.raises(KeelError, match="need 7 classes of at least 12 rows; 6 of the 7 classes"):
        EpisodeSampler(LABELS, n_way=7, k_shot=5, n_query=7)
    with pytest.raises(KeelError, match="k_shot >= 1"):
        EpisodeSampler(LABELS, n_way=2, k_shot=0, n_query=1)


def test_same_seed_same_episodes():
    a = list(EpisodeSampler(LABELS, 3, 2, 2, seed=4).episodes(5))
    assert a == list(EpisodeSampler(LABELS, 3, 2, 2, seed=4).episodes(5))
    assert a != list(EpisodeSampler(LABELS, 3, 2, 2, seed=5).episodes(5))


# -- heads -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoTokenizer

    from keel.models import model_dir
    from keel.tasks.classification import build_model

    torch.manual_seed(0)
    return build_model(model_dir("tiny-bert"), ["neg", "pos"]).eval(), AutoTokenizer.from_pretrained(
        model_dir("tiny-bert")
    )


TEXTS = ["the bus was late", "a lovely ride", "my refund never came", "the taxi was awful", "ok", "where is my money"]


def test_prototype_head_is_the_nearest_centroid_rule(tiny):
    model, tok = tiny
    feats = embed(model, tok, TEXTS, 32)  # (6, H)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    centroids = prototypes(feats, y, 3)  # (3, H)
    assert torch.allclose(centroids[2], feats[[2, 5]].mean(0))
    weight, bias = prototype_weights(centroids)
    logits = feats @ weight.T + bias  # (6, 3)
    # -||x - c||^2 = logits - ||x||^2: the same softmax, the same argmax as the distances themselves
    assert torch.allclose(logits - (feats**2).sum(-1, keepdim=True), -squared_distances(feats, centroids), atol=1e-4)
    assert torch.equal(logits.argmax(-1), squared_distances(feats, centroids).argmin(-1))


def test_set_head_gives_a_model_whose_logits_are_the_head(tiny):
    import copy

    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    feats = embed(model, tok, TEXTS, 32)
    weight, bias = prototype_weights(prototypes(feats, torch.tensor([0, 1, 2, 0, 1, 2]), 3))
    set_head(model, weight, bias, ["neg", "pos", "refund"])
    assert model.config.num_labels == 3 and model.config.id2label[2] == "refund"
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc).logits  # (6, 3) through the whole Hugging Face model
    assert torch.allclose(out, feats @ weight.T + bias, atol=1e-4)
    assert head_linear(model)[2].out_features == 3


@pytest.mark.parametrize("n_classes", [2, 3])
def test_logistic_head_predicts_what_scikit_learn_does(n_classes):
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 8, generator=g)
    y = torch.arange(40) % n_classes
    feats[:, 0] += 2 * y  # separable along one axis
    weight, bias = logistic_weights(feats, y, n_classes)
    assert weight.shape == (n_classes, 8) and bias.shape == (n_classes,)
    sk = LogisticRegression(max_iter=1000, class_weight="balanced", random_state=0).fit(feats.numpy(), y.numpy())
    assert (feats @ weight.T + bias).argmax(-1).tolist() == sk.predict(feats.numpy()).tolist()


# -- training ----------------------------------------------------------------------------------------------


def test_contrastive_pairs_are_one_positive_and_one_negative_per_row_and_iteration():
    y = [0, 0, 1, 1, 2]
    pairs = contrastive_pairs(y, iterations=3, seed=0)
    assert len(pairs) == 2 * 3 * len(y)
    for a, b, target in pairs:
        assert (y[a] == y[b]) == (target == 1.0)
        if target == 1.0 and a != 4:  # row 4 is the only one of its class: its positive is itself
            assert a != b
    assert sum(t for *_, t in pairs) == 3 * len(y)


def test_episodic_training_moves_the_encoder_and_keeps_finite_losses(tiny):
    import copy

    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    texts = [f"{w} trip number {i}" for i, w in enumerate(["good", "bad", "late"] * 4)]
    y = [i % 3 for i in range(12)]
    before = [p.detach().clone() for p in model.parameters()]
    losses = episodic_train(model, tok, texts, y, 32, episodes=3, n_way=3, k_shot=2, n_query=2, lr=1e-3)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not model.training


# -- the support file --------------------------------------------------------------------------------------


def test_support_file_is_read_with_labels_as_names(tmp_path):
    p = tmp_path / "s.jsonl"
    rows = [{"text": "a", "label": 3}, {"text": "b", "label": 3.0}, {"text": "c", "label": "refund"}]
    rows.append({"text": "a", "label": 3})  # an exact repeat is dropped
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_support(p, "text", "label") == (["a", "b", "c"], ["3", "3", "refund"])
    texts, labels = read_support(p, "text", "label", k_shot=1)
    assert labels == ["3", "refund"] and texts[0] in ("a", "b")


@pytest.mark.parametrize(
    "name, body, message",
    [
        (
            "s.csv",
            "sentence,label\nhi,a\n",
            "has no text column 'text' (columns: sentence, label); set fewshot.text_column",
        ),
        ("s.csv", "text,tag\nhi,a\n", "has no label column 'label' (columns: text, tag); set fewshot.label_column"),
        ("s.jsonl", '{"text": "hi", "label": 1.5}\n', "row 1: label 1.5 is not a label name"),
        ("s.jsonl", '{"text": "hi", "label": ["a"]}\n', "row 1: label ['a'] is not a label name"),
        ("s.csv", "text,label\nhi,\n", "row 1: label '' is not a label name"),
        ("s.csv", "text,label\n,a\n", "row 1: the 'text' value is empty"),
        ("s.csv", "text,label\nhi,a\nhi,b\n", "row 2: the same text is labelled 'a' on an earlier row"),
        ("s.csv", "text,label\n", "has no rows"),
        ("s.xlsx", "x", "cannot tell the format of 's.xlsx'"),
        ("s.jsonl", "{not json\n", "cannot read s.jsonl as jsonl"),
    ],
)
def test_bad_support_files_are_refused_in_one_line(tmp_path, name, body, message):
    p = tmp_path / name
    p.write_text(body)
    with pytest.raises(DataError) as e:
        read_support(p, "text", "label")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_support_file_is_named(tmp_path):
    with pytest.raises(DataError, match="--support: file '.*nope.csv' not found"):
        read_support(tmp_path / "nope.csv", "text", "label")


# -- keel fewshot on a run ---------------------------------------------------------------------------------


def build_source_run(work: Path) -> tuple[Path, Path]:
    """A finished tiny classification run (tiny-bert trained for a few steps, frozen splits) and a support file."""
    import pandas as pd
    from transformers import AutoTokenizer

    from keel.data.load import RawSplits
    from keel.data.splits import freeze
    from keel.models import model_dir
    from keel.recipe import load_recipe
    from keel.rundir import start
    from keel.tasks.classification import build_model
    from keel.train.engine import save_final_model

    csv = write_toy_csv(work / "toy.csv", n=60)
    (work / "tiny.yaml").write_text(TINY_RECIPE.format(data=csv, epochs=1, every=0))
    recipe = load_recipe(work / "tiny.yaml")
    run_dir = work / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    frame = pd.read_csv(csv, dtype=str)
    raw = RawSplits(
        frame[:36],
        frame[36:48].reset_index(drop=True),
        frame[48:].reset_index(drop=True),
        ["neg", "pos"],
        str(csv),
        "0" * 64,
    )
    freeze(run_dir, raw)
    start(recipe, run_dir, False)
    # in place of pretraining and fine-tuning: a few full-batch steps on four labels, the two old ones and two
    # more (texts unlike the support file's), then the head keeps the old labels' rows only: an encoder that
    # knows more than its head, as a pretrained one does
    extra = [(f"{f} was late by {i} minutes", "late") for i, f in enumerate(["the bus", "my train", "a taxi"] * 3)]
    extra += [(f"a refund for {f} number {i}", "money") for i, f in enumerate(["the car", "my trip", "a ride"] * 3)]
    names = [*raw.labels, "late", "money"]
    texts = raw.train["text"].tolist() + [x for x, _ in extra]
    y = torch.tensor([names.index(n) for n in raw.train["label"].tolist() + [n for _, n in extra]])
    torch.manual_seed(0)
    model = build_model(model_dir("tiny-bert"), names)
    tok = AutoTokenizer.from_pretrained(model_dir("tiny-bert"))
    enc = dict(tok(texts, padding=True, return_tensors="pt"))
    opt, threads = torch.optim.AdamW(model.parameters(), lr=1e-2), torch.get_num_threads()
    torch.set_num_threads(1)  # a busy 2-core machine: one thread is faster for a model this small
    for _ in range(15):
        loss = model(**enc, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    layer = head_linear(model.eval())[2]
    set_head(model, layer.weight[:2].detach(), layer.bias[:2].detach(), raw.labels)
    summary = {"labels": raw.labels, "best_step": 0, "selection_metric": "accuracy", "best_metric": 0.0}
    save_final_model(model, tok, run_dir / "model", recipe, summary)
    support = work / "support.csv"
    support.write_text(
        "text,label\nthe train was late again,delay\nmy flight left two hours late,delay\n"
        "where is my refund,refund\nI want my money back,refund\nthe ride was lovely indeed,pos\n"
    )
    return run_dir, support


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    return build_source_run(tmp_path_factory.mktemp("fewshot"))


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _config(**fields):
    from keel.recipe.fewshot import FewshotConfig

    return FewshotConfig(**fields)


def test_fewshot_run_adds_labels_keeps_old_ones_and_loads_like_any_run(source_run):
    from keel.evaluate import predict
    from keel.fewshot.adapt import add_labels
    from keel.recipe import load_recipe
    from keel.runtime.load import load_trained
    from keel.serve.engines import load_engine

    run_dir, support = source_run
    before = _snapshot(run_dir)
    result = add_labels(run_dir, support, load_recipe(run_dir / "recipe.yaml"), _config(k_shot=1))
    new = Path(result["run_dir"])
    assert new == run_dir.with_name("tiny-fewshot")
    assert _snapshot(run_dir) == before  # the source run is only read
    assert result["labels"] == ["neg", "pos", "delay", "refund"]  # old labels keep their indices
    assert result["new_labels"] == ["delay", "refund"] and result["shots"]["delay"] == 1
    assert result["old_test"]["rows"] > 0 and result["old_test"]["accuracy_after"] is not None
    t = load_trained(new)  # manifest, sealed recipe and all
    assert t.info["labels"] == result["labels"] and t.model.config.num_labels == 4
    # K = 1: the one support row of a new label is its prototype (distance 0), so it is predicted as that label
    support_rows = dict(zip(*read_support(support, "text", "label", k_shot=1)))
    shots = [text for text, label in support_rows.items() if label in ("delay", "refund")]
    assert [p["label"] for p in predict(new, shots)] == [support_rows[x] for x in shots]
    engine = load_engine(str(new))  # keel serve's loader
    assert engine.labels == result["labels"]
    assert [r["label"] for r in engine.classify(shots)] == [support_rows[x] for x in shots]
    assert json.loads((new / "fewshot.json").read_text())["method"] == "prototype"
    assert json.loads((new / "run.json").read_text())["status"] == "finished"
    second = add_labels(run_dir, support, load_recipe(run_dir / "recipe.yaml"), _config(k_shot=1))
    assert Path(second["run_dir"]).name == "tiny-fewshot-2"  # never over an earlier one


def test_setfit_with_meta_training_writes_a_run_too(source_run):
    from keel.evaluate import predict
    from keel.fewshot.adapt import add_labels
    from keel.recipe import load_recipe
    from keel.recipe.fewshot import ContrastiveConfig, MetaConfig

    run_dir, support = source_run
    cfg = _config(
        method="setfit",
        old_examples=8,
        contrastive=ContrastiveConfig(iterations=1, max_pairs=32),
        meta=MetaConfig(episodes=2, k_shot=2, n_query=2),
        output_dir=str(run_dir.parent / "setfit"),
    )
    result = add_labels(run_dir, support, load_recipe(run_dir / "recipe.yaml"), cfg)
    assert result["trained"]["meta"]["episodes"] == 2 and result["trained"]["meta"]["n_way"] == 2
    assert result["trained"]["contrastive"]["steps"] == 2
    assert result["old_rows"].startswith("refitted")  # the encoder changed: the trained rows no longer fit it
    val = result["old_validation"]
    assert val["accuracy_before"] - val["accuracy_after"] <= 0.02  # written only within the gate
    assert set(result["new_held_out"]) == {"delay", "refund"}
    assert {p["label"] for p in predict(result["run_dir"], ["x"])} <= {"neg", "pos", "delay", "refund"}


def test_fewshot_refusals_leave_nothing_on_disk(source_run, tmp_path):
    from keel.fewshot.adapt import add_labels
    from keel.recipe import load_recipe
    from keel.recipe.fewshot import MetaConfig

    run_dir, support = source_run
    recipe = load_recipe(run_dir / "recipe.yaml")
    listing = sorted(p.name for p in run_dir.parent.iterdir())
    bad = tmp_path / "bad.csv"
    bad.write_text("text,tag\nhi,a\n")
    with pytest.raises(DataError, match="no label column 'label'"):
        add_labels(run_dir, bad, recipe, _config())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(KeelError, match="already holds files"):
        add_labels(run_dir, support, recipe, _config(output_dir=str(tmp_path / "full")))
    with pytest.raises(KeelError, match="not found"):
        add_labels(run_dir.parent / "nope", support, recipe, _config())
    with pytest.raises(
        KeelError, match="fewshot.meta: 2-way 4-shot episodes with 4 queries need 2 classes of at least 8"
    ):
        add_labels(run_dir, support, recipe, _config(old_examples=5, meta=MetaConfig(episodes=1)))
    assert sorted(p.name for p in run_dir.parent.iterdir()) == listing  # no half-written run, no temp folder


def test_k_shot_zero_is_a_recipe_error(source_run):
    from keel.errors import RecipeError
    from keel.recipe import load_recipe

    run_dir, _ = source_run
    with pytest.raises(RecipeError, match="fewshot.k_shot"):
        load_recipe(run_dir / "recipe.yaml", ["fewshot.k_shot=0"])


@pytest.mark.slow
def test_cli_adds_a_label_that_predict_then_serves(source_run, tmp_path):
    run_dir, support = source_run
    new = tmp_path / "with-refunds"
    proc = keel(
        "fewshot",
        str(run_dir),
        "--support",
        str(support),
        "fewshot.k_shot=1",
        f"fewshot.output_dir={new}",
        cwd=tmp_path,
        check=True,
    )
    assert "2 new" in proc.stdout and f"new run: {new}" in proc.stdout.replace("\n", "")
    texts = [text for text, label in zip(*read_support(support, "text", "label", k_shot=1)) if label == "refund"]
    pred = keel("predict", str(new), texts[0], "--json", cwd=tmp_path, check=True)
    assert json.loads(pred.stdout.splitlines()[-1])["label"] == "refund"


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--support", "missing.csv"], "--support: file 'missing.csv' not found"),
        (["--support", "s.csv", "fewshot.k_shot=0"], "fewshot.k_shot"),
        (["--support", "s.csv", "train.lr=1"], "keel fewshot takes fewshot.* overrides only"),
        (["--support", "bad.csv"], "has no label column 'label' (columns: text, tag)"),
    ],
)
def test_cli_refuses_bad_input_in_one_line(source_run, tmp_path, args, message):
    run_dir, support = source_run
    (tmp_path / "s.csv").write_text(support.read_text())
    (tmp_path / "bad.csv").write_text("text,tag\nhi,a\n")
    proc = keel("fewshot", str(run_dir), *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1
