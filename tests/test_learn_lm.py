"""`keel learn` on a causal-LM run: thumbs -> KTO, preferences -> DPO (TRL, through keel/align/trainers.py), each
round judged on the run's held-out perplexity and the feedback's held-out part; the no-text refusal."""

from __future__ import annotations

import asyncio
import json

import pytest

from keel.errors import KeelError

RECIPE = """
name: lm
task: causal-lm
model: {{name: tiny-llama, max_length: 32}}
data:
  path: {data}
  split: {{validation: 0.2, test: 0.2, seed: 0}}
  max_train_samples: 16
train: {{epochs: 1, batch_size: 4, lr: 1.0e-3, warmup_ratio: 0.0, max_steps: 1}}
learn: {{min_feedback: 4, epochs: 1, max_steps: 2, lr: 1.0e-2, holdout: 0.4}}
"""

PROMPTS = [f"The tram to stop {i} is" for i in range(12)]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    from keel.pipeline import train_run
    from keel.recipe import load_recipe

    work = tmp_path_factory.mktemp("learn-lm")
    lines = [{"text": f"The tram to stop {i} is late again, said the driver at {i % 5}."} for i in range(60)]
    (work / "lines.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    (work / "lm.yaml").write_text(RECIPE.format(data=work / "lines.jsonl"))
    return train_run(load_recipe(work / "lm.yaml", [f"output.dir={work / 'runs' / 'lm'}"]))


def _store(run_dir, rows: list[dict]) -> None:
    """Rows written with keel's own store, as the server does after POST /v1/feedback."""
    from keel.rundir import feedback_db
    from keel.serve.feedback import FeedbackStore, sha256_text

    store = FeedbackStore(feedback_db(run_dir))

    async def send():
        for i, r in enumerate(rows):
            row = {
                "created": 0.0,
                "response_id": f"cmpl-{i}",
                "idx": 0,
                "route": "completions",
                "model_version": "base",
                "model_sha256": "",
                "input_sha256": sha256_text(r["prompt"]),
                "output_sha256": sha256_text(r["out"]),
                **{k: v for k, v in r.items() if k not in ("prompt", "out", "rejected")},
                "input_text": r["prompt"] if r.get("store", True) else None,
                "output_text": r["out"] if r.get("store", True) else None,
            }
            row.pop("store", None)
            if "rejected" in r:
                row.update(
                    rejected_text=row["input_text"] and r["rejected"], rejected_sha256=sha256_text(r["rejected"])
                )
            await store.append(row)

    asyncio.run(send())
    store.close()


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _differs(a: dict, b: dict) -> bool:
    return any(not (a[k] == b[k]).all() for k in a)


@pytest.mark.slow  # trains a tiny LM, then a KTO and a DPO challenger
def test_kto_then_dpo_rounds_record_decisions_with_figures(lm_run):
    from keel.learn.loop import learn, rollback
    from keel.rundir import current_version, version_dir

    thumbs = [  # each prompt: a desirable and an undesirable completion
        {"prompt": p, "out": out, "kind": "thumbs", "thumbs": up}
        for p in PROMPTS
        for out, up in ((" on time", "up"), (" late", "down"))
    ]
    _store(lm_run, thumbs)
    kto = learn(lm_run, ["learn.margin=-100", "learn.max_perplexity_rise=1000"])
    assert kto["method"] == "kto" and kto["action"] == "promoted", kto["why"]
    new, old = kto["figures"]["new"], kto["figures"]["old"]
    assert new["n"] == kto["data"]["feedback_heldout"] > 0 and old["n"] > 0
    assert all(isinstance(new[k], float) for k in ("champion", "challenger", "gain"))
    assert old["champion"] > 1 and old["challenger"] > 1 and "rise" in old
    assert "frozen validation split" in old["set"]
    v1 = kto["challenger"]
    assert current_version(lm_run) == v1
    assert _differs(_weights(version_dir(lm_run, v1) / "model"), _weights(lm_run / "model"))  # KTO really trained
    saved = json.loads((lm_run / "learn" / "decisions" / f"{kto['round']:04d}.json").read_text())
    assert saved["figures"] == kto["figures"] and saved["rule"]["max_perplexity_rise"] == 1000

    prefs = [{"prompt": p, "out": " on time", "rejected": " late", "kind": "preference"} for p in PROMPTS]
    _store(lm_run, prefs)
    dpo = learn(lm_run, ["learn.margin=-1", "learn.max_perplexity_rise=1000"])  # only preferences since v1: DPO
    assert dpo["method"] == "dpo" and dpo["action"] == "promoted" and dpo["champion"] == v1, dpo["why"]
    assert 0.0 <= dpo["figures"]["new"]["challenger"] <= 1.0 and "reward_margin" in dpo["figures"]["new"]
    v2 = dpo["challenger"]
    assert _differs(_weights(version_dir(lm_run, v2) / "model"), _weights(version_dir(lm_run, v1) / "model"))
    assert json.loads((version_dir(lm_run, v2) / "model" / "keel.json").read_text())["learned_from"] == v1
    assert rollback(lm_run)["now_serving"] == v1 and current_version(lm_run) == v1
    from keel.serve.engines import load_engine

    served = load_engine(str(lm_run))  # what `keel serve` loads now: the version rolled back to
    assert served.version == v1 and served.kind == "causal-lm" and len(served.model_sha256) == 64


@pytest.mark.slow  # trains a tiny LM
def test_rows_without_their_texts_are_refused_with_the_fix(tmp_path_factory, lm_run):
    import shutil

    from keel.learn.loop import learn

    other = tmp_path_factory.mktemp("notext")
    run = shutil.copytree(lm_run, other / "lm", ignore=shutil.ignore_patterns("feedback", "learn"))
    _store(run, [{"prompt": p, "out": " late", "kind": "thumbs", "thumbs": "down", "store": False} for p in PROMPTS])
    with pytest.raises(KeelError, match="serve.feedback.store_text: true") as e:
        learn(run)
    assert "cannot be recovered" in str(e.value)
    assert not (run / "learn" / "decisions").exists()  # nothing recorded, nothing trained


def test_lm_promotion_needs_the_margin_and_bounds_the_perplexity_rise():
    from keel.learn.lm import decide_lm

    def figures(new0, new1, old0, old1, n=7):
        return {
            "new": {"metric": "preference accuracy", "champion": new0, "challenger": new1},
            "old": {"set": "the run's frozen validation split", "champion": old0, "challenger": old1, "n": n},
        }

    assert decide_lm(figures(0.5, 0.75, 20.0, 20.5), 0.25, 0.05)[0]  # a gain equal to the margin, +2.5%
    ok, why = decide_lm(figures(0.5, 0.6, 20.0, 20.0), 0.25, 0.05)
    assert not ok and "learn.margin=0.25" in why
    f = figures(0.5, 1.0, 20.0, 22.0)
    ok, why = decide_lm(f, 0.0, 0.05)
    assert not ok and "learn.max_perplexity_rise=0.05" in why and f["old"]["rise"] == 0.1
    assert decide_lm(figures(0.5, 1.0, None, None, n=0), 0.1, 0.0)[0]  # no held-out split: the feedback alone


def test_generation_feedback_splits_by_prompt_and_turns_pairs_into_kto_examples():
    from keel.learn.generations import generation_feedback, kto_data, pick_method

    class Tok:
        bos_token, eos_token, chat_template = "<s>", "</s>", None

    def row(i, kind, prompt, out, **kw):
        from keel.serve.feedback import sha256_text

        return {
            "id": i,
            "kind": kind,
            "route": "completions",
            "input_text": prompt,
            "input_sha256": sha256_text(prompt),
            "output_text": out,
            "output_sha256": sha256_text(out),
            "rejected_text": kw.get("rejected"),
            "rejected_sha256": kw.get("rejected") and sha256_text(kw["rejected"]),
            "thumbs": kw.get("thumbs"),
        }

    rows = [row(i, "preference", f"p{i}", "good", rejected="bad") for i in range(40)]
    rows += [row(100, "thumbs", "p0", "good", thumbs="down"), row(101, "thumbs", "p0", "good", thumbs="up")]
    rows.append(row(102, "label", "x", "pos"))  # a classifier's kind: not read here
    fb = generation_feedback(rows, Tok(), 0.25)
    assert fb.rows == 42 and fb.last_id == 101
    assert all(p["prompt"].startswith("<s>p") for p in fb.pairs + fb.pairs_heldout)  # as the server tokenized it
    held = {p["prompt"] for p in fb.pairs_heldout}
    assert held and not held & {p["prompt"] for p in fb.pairs}
    assert len(fb.examples) + len(fb.examples_heldout) == 1  # the later thumbs on the same completion wins
    assert (fb.examples or fb.examples_heldout)[0]["label"] is True
    assert pick_method(fb, "auto") == "kto" and pick_method(fb, "dpo") == "dpo"
    train, _ = kto_data(fb)
    assert sum(ex["label"] for ex in train) == len(fb.pairs) + len([e for e in fb.examples if e["label"]])
    only_prefs = generation_feedback(rows[:40], Tok(), 0.25)
    assert pick_method(only_prefs, "auto") == "dpo"
    chat = dict(row(103, "thumbs", json.dumps([{"role": "user", "content": "hi"}]), "hello", thumbs="up"), route="chat")
    one = generation_feedback([chat], Tok(), 0.25)
    assert [e["prompt"] for e in one.examples + one.examples_heldout] == ["<s>user: hi\nassistant:"]  # as served


@pytest.mark.slow  # serves the tiny LM run
def test_a_served_lm_swaps_to_a_promoted_version_without_a_failed_request(tmp_path, lm_run):
    """A version (the run's weights, copied as learn/v0001) is promoted while clients generate and send thumbs;
    every response is 200 and the feedback goes from naming base to naming v0001."""
    import shutil

    from serve_helpers import Server, promote_under_load

    run = shutil.copytree(lm_run, tmp_path / "lm", ignore=shutil.ignore_patterns("learn", "feedback"))
    server = Server(
        str(run), "--set", "serve.num_threads=1", "--set", "serve.feedback.poll_s=0.2", "--set", "serve.max_tokens=8"
    )

    def request(k: int, n: int):
        return "/v1/completions", {"prompt": f"The tram to stop {k}", "max_tokens": 6}

    try:
        statuses, versions = promote_under_load(server, run, request, clients=4, before=6, after=6, timeout=120)
    finally:
        server.stop()
    assert set(statuses) == {200}, (statuses, server.log[-3000:])
    assert versions[0] == "base" and versions[-1] == "v0001"
