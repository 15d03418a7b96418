"""`keel learn`: the promotion rule, a round on a tiny run (challenger, decision, state, versions side by side),
a refusal, rollback, and the CLI."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import TINY_RECIPE, keel, write_toy_csv

from keel.errors import KeelError
from keel.learn.loop import decide


def _figures(new_champ, new_chall, old_champ, old_chall, old_n=10):
    return {
        "new": {"champion": new_champ, "challenger": new_chall, "n": 10},
        "old": {"champion": old_champ, "challenger": old_chall, "n": old_n},
    }


def test_promotion_needs_the_margin_on_new_data_and_no_drop_beyond_the_bound_on_old():
    assert decide(_figures(0.5, 0.6, 0.8, 0.8), 0.05, 0.01)[0]
    assert decide(_figures(0.5, 0.6, 0.8, 0.8), 0.1, 0.01)[0]  # a gain equal to the margin is enough
    ok, why = decide(_figures(0.5, 0.52, 0.8, 0.8), 0.05, 0.01)
    assert not ok and "learn.margin=0.05" in why
    ok, why = decide(_figures(0.5, 0.9, 0.8, 0.7), 0.05, 0.05)
    assert not ok and "learn.max_old_drop=0.05" in why
    figures = _figures(0.5, 0.9, 0.0, 0.0, old_n=0)  # no validation split: judged on the new data alone
    assert decide(figures, 0.05, 0.0)[0] and figures["old"]["drop"] == 0.0 and figures["new"]["gain"] == 0.4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from keel.pipeline import train_run
    from keel.recipe import load_recipe

    work = tmp_path_factory.mktemp("learn")
    csv = write_toy_csv(work / "toy.csv", n=80)
    (work / "tiny.yaml").write_text(TINY_RECIPE.format(data=csv, epochs=1, every=0))
    overrides = [
        f"output.dir={work / 'runs' / 'tiny'}",
        "train.max_steps=2",
        "learn.min_feedback=4",
        "learn.epochs=1",
        "learn.max_steps=2",
    ]
    return train_run(load_recipe(work / "tiny.yaml", overrides))


def _post(run_dir, texts: list[str], label: str = "pos", store_text: bool = True) -> None:
    from keel.rundir import feedback_db
    from keel.serve.feedback import FeedbackStore, sha256_text

    store = FeedbackStore(feedback_db(run_dir))

    async def send():
        for i, t in enumerate(texts):
            await store.append(
                {
                    "created": 0.0,
                    "response_id": f"clf-{i}",
                    "idx": 0,
                    "route": "classify",
                    "kind": "label",
                    "model_version": "base",
                    "model_sha256": "",
                    "input_text": t if store_text else None,
                    "input_sha256": sha256_text(t),
                    "label": label,
                }
            )

    asyncio.run(send())
    store.close()


@pytest.mark.slow  # trains a challenger
def test_a_round_promotes_records_its_figures_and_rolls_back(run_dir):
    from keel.learn.loop import learn, rollback
    from keel.rundir import current_version, learn_state, version_dir
    from keel.runtime.load import load_trained

    assert learn(run_dir)["action"] == "skipped"  # no feedback yet: nothing trained, the decision says why
    _post(run_dir, [f"the tram was splendid number {i}" for i in range(24)])
    decision = learn(run_dir, ["learn.margin=0", "learn.max_old_drop=1"])
    assert decision["action"] == "promoted", decision["why"]
    assert decision["challenger"] == "v0002" and decision["champion"] == "base"
    saved = json.loads((run_dir / "learn" / "decisions" / "0002.json").read_text())
    assert saved["figures"]["old"]["n"] > 0 and saved["figures"]["new"]["n"] == decision["data"]["feedback_heldout"]
    assert {"champion", "challenger", "gain"} <= set(saved["figures"]["new"])
    assert decision["data"]["replay"] == decision["data"]["feedback_train"]  # learn.replay: 1 by default
    assert current_version(run_dir) == "v0002"
    assert (run_dir / "model" / "manifest.json").is_file()  # the base model stays beside the new version
    trained = load_trained(version_dir(run_dir, "v0002"))
    assert trained.info["learned_from"] == "base"
    assert learn(run_dir)["action"] == "skipped"  # that feedback was learned from: it is not used again
    back = rollback(run_dir)
    assert back["action"] == "rollback" and current_version(run_dir) == "base"
    assert learn_state(run_dir)["history"] == ["base"]
    with pytest.raises(KeelError, match="no earlier version to roll back to"):
        rollback(run_dir)


@pytest.mark.slow  # trains a challenger
def test_a_refused_challenger_changes_nothing_served(run_dir, monkeypatch):
    import keel.learn.loop as loop
    from keel.rundir import current_version, learn_state

    before = learn_state(run_dir)
    _post(run_dir, [f"the ferry was dreadful number {i}" for i in range(24)], label="neg")

    def planted(model_dir, frame, batch_size=64):  # the challenger forgets the old data
        old = "challenger" if model_dir.name.startswith("v") else "champion"
        return {"accuracy": 0.5 if old == "challenger" and len(frame) > 10 else 0.9, "n": len(frame)}

    monkeypatch.setattr(loop, "score", planted)
    decision = loop.learn(run_dir, ["learn.margin=-1", "learn.max_old_drop=0.1"])
    assert decision["action"] == "refused" and "learn.max_old_drop=0.1" in decision["why"]
    assert current_version(run_dir) == before["current"] and learn_state(run_dir) == before
    assert not (run_dir / "learn" / decision["challenger"]).exists()  # its figures are kept, its weights not


def test_label_feedback_without_text_is_refused_with_the_fix(tmp_path):
    from keel.learn.data import label_feedback

    rows = [{"id": 1, "route": "classify", "input_text": None, "input_sha256": "0" * 64, "label": "pos"}]
    with pytest.raises(KeelError, match="store_text"):
        label_feedback(rows, ["neg", "pos"], 0.25)


@pytest.mark.slow  # runs `keel learn` in a subprocess
def test_cli_learn_and_rollback(tmp_path):
    csv = write_toy_csv(tmp_path / "toy.csv", n=60)
    (tmp_path / "tiny.yaml").write_text(TINY_RECIPE.format(data=csv, epochs=1, every=0))
    run = tmp_path / "runs" / "tiny"
    keel("train", str(tmp_path / "tiny.yaml"), f"output.dir={run}", "train.max_steps=1", cwd=tmp_path, check=True)
    out = keel("learn", str(run), cwd=tmp_path, check=True)
    assert "skipped" in out.stdout and "learn.min_feedback" in out.stdout
    bad = keel("learn", str(run), "--rollback", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "no earlier version to roll back to" in bad.stderr
    assert "Traceback" not in bad.stderr
