"""Generative models: pretraining from scratch, LoRA SFT + merge, reward model, DPO, RL, LM bias metrics.

All on tiny random models (tiny-llama, llama-micro), offline. The DPO/reward/RL checks call keel's trainer
glue directly (TRL underneath); the recipes run through the real CLI.
"""

from __future__ import annotations

import hashlib
import json
import math
import random

import pytest
import torch
from conftest import keel

NAMES = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jon", "Kim", "Lou"]


def planted_pairs(n: int, seed: int = 0, same: bool = False) -> list[dict]:
    """Preferences with a planted rule: 'kind' is always chosen over 'cruel'."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        chosen = " kind and gentle to everyone."
        rows.append(
            {
                "prompt": f"{rng.choice(NAMES)} number {i} is",
                "chosen": chosen,
                "rejected": chosen if same else " cruel and rude to everyone.",
            }
        )
    return rows


def fingerprint(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoTokenizer

    from keel.models import model_dir

    path = model_dir("tiny-llama")
    tok = AutoTokenizer.from_pretrained(path)
    return path, tok


def _align_cfg(**kw):
    from keel.recipe import AlignConfig

    return AlignConfig(**{"lora": None, **kw})


def test_dpo_loss_is_log2_when_chosen_equals_rejected(tiny):
    from keel.align.trainers import train_dpo

    path, tok = tiny
    _, logs = train_dpo(
        path, tok, planted_pairs(16, same=True), _align_cfg(), steps=3, lr=1e-2, batch_size=4, seed=0, max_length=32
    )
    losses = [r["loss"] for r in logs if "loss" in r]
    assert len(losses) == 3
    # the margin is exactly zero whatever the policy does, so every step sits at -log sigmoid(0) = log 2
    assert all(abs(x - math.log(2)) < 1e-4 for x in losses), losses


@pytest.mark.slow
def test_dpo_learns_and_the_reference_stays_frozen(tiny):
    from keel.align.trainers import load_policy, train_dpo

    path, tok = tiny
    ref = load_policy(path)
    before_ref, before_policy = fingerprint(ref), fingerprint(load_policy(path))
    policy, logs = train_dpo(
        path,
        tok,
        planted_pairs(32),
        _align_cfg(beta=0.5),
        steps=6,
        lr=3e-3,
        batch_size=8,
        seed=0,
        max_length=32,
        ref_model=ref,
    )
    assert fingerprint(ref) == before_ref  # bitwise
    assert fingerprint(policy) != before_policy
    losses = [r["loss"] for r in logs if "loss" in r]
    assert abs(losses[0] - math.log(2)) < 1e-3  # policy == reference at the first step
    assert losses[-1] < losses[0] - 0.02


@pytest.mark.slow
def test_dpo_lora_leaves_the_base_weights_alone(tiny):
    from keel.align.trainers import load_policy, merged, train_dpo
    from keel.recipe import LoraConfig

    path, tok = tiny
    base = fingerprint(load_policy(path))
    policy, _ = train_dpo(
        path,
        tok,
        planted_pairs(16),
        _align_cfg(lora=LoraConfig(r=4, alpha=8)),
        steps=3,
        lr=1e-2,
        batch_size=8,
        seed=0,
        max_length=32,
    )
    with policy.disable_adapter():  # the frozen reference: the base model, adapter off
        plain = {
            k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in policy.state_dict().items()
            if "lora_" not in k
        }
    fresh = load_policy(path).state_dict()
    assert all(torch.equal(plain[k], fresh[k]) for k in fresh)
    assert fingerprint(merged(policy)) != base  # and the merged policy did move


@pytest.mark.slow
def test_reward_model_ranks_a_planted_preference(tiny):
    from keel.align.trainers import pairwise_accuracy, reward_scores, train_reward_model

    path, tok = tiny
    pairs = planted_pairs(60)
    rm, _ = train_reward_model(path, tok, pairs[:40], steps=25, lr=1e-3, batch_size=8, seed=0, max_length=32)
    held_out = pairs[40:]
    assert pairwise_accuracy(rm, tok, held_out) == 1.0
    # and the ranking is about the planted word, not the position: swap them and it flips
    swapped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in held_out]
    assert pairwise_accuracy(rm, tok, swapped) == 0.0
    kind, cruel = reward_scores(
        rm, tok, ["Zed number 999 is kind and gentle to everyone.", "Zed number 999 is cruel and rude to everyone."]
    )
    assert kind > cruel


@pytest.mark.slow
def test_grpo_with_reward_model_and_kl_penalty(tiny):
    from keel.align.trainers import load_policy, train_reward_model, train_rl

    path, tok = tiny
    rm, _ = train_reward_model(path, tok, planted_pairs(16), steps=2, lr=1e-3, batch_size=8, seed=0, max_length=32)
    before = fingerprint(load_policy(path))
    cfg = _align_cfg(method="grpo", beta=0.1, num_generations=2, max_new_tokens=4)
    policy, logs = train_rl(path, tok, [p["prompt"] for p in planted_pairs(8)], rm, cfg, steps=2, lr=1e-2, seed=0)
    assert fingerprint(policy) != before
    assert any("kl" in r for r in logs)  # beta > 0: the KL to the reference is computed and logged


def test_lora_merge_gives_the_adapter_outputs(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from keel.sft import merge_lora

    path, tok = tiny
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    ids = torch.tensor([tok("To be or not to be, that is the question.")["input_ids"]])
    with torch.no_grad():
        adapter_logits = model(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)  # the adapter does something
    merged = merge_lora(model)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", use_safetensors=True)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapter_logits, atol=1e-5)
        assert torch.allclose(reloaded(input_ids=ids).logits, adapter_logits, atol=1e-5)


def test_lm_bias_metrics_match_a_direct_computation(tiny):
    from transformers import AutoModelForCausalLM

    from keel.align.lm_bias import crows_pairs_score, sentence_logprobs

    path, tok = tiny
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    texts = ["The doctor said she was tired.", "He fixed the old car.", "They went home early today."]
    got = sentence_logprobs(model, tok, texts, batch_size=2)  # padded batches
    for text, lp in zip(texts, got):
        ids = torch.tensor([tok(tok.bos_token + text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        assert lp == pytest.approx(-loss * (ids.shape[1] - 1), rel=1e-4)
    pairs = [
        {"sent_more": a, "sent_less": b, "bias_type": "x"}
        for a, b in [(texts[0], texts[1]), (texts[1], texts[2]), (texts[2], texts[0])]
    ]
    expected = 100 * sum(got[i] > got[j] for i, j in [(0, 1), (1, 2), (2, 0)]) / 3
    assert crows_pairs_score(model, tok, pairs)["stereotype_score"] == pytest.approx(expected)


PRETRAIN = """
name: pt
task: causal-lm
model: {name: llama-micro, init: scratch, max_length: 32}
pretrain: {vocab_size: 300, samples: 2, sample_tokens: 8}
data:
  path: corpus.jsonl
  split: {validation: 0.1, test: 0.1, seed: 0}
train: {epochs: 2, batch_size: 8, lr: 1.0e-2, warmup_ratio: 0.0, eval_batch_size: 16}
"""


@pytest.mark.slow
def test_pretraining_from_scratch_lowers_the_loss(tmp_path):
    rng = random.Random(0)
    words = "the king and queen walk to the castle where a knight sings of love and war".split()
    docs = [{"text": " ".join(rng.choice(words) for _ in range(60)) + "."} for _ in range(60)]
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "pt.yaml").write_text(PRETRAIN)
    keel("validate", "pt.yaml", cwd=tmp_path, check=True)
    keel("run", "pt.yaml", cwd=tmp_path, check=True)
    run = tmp_path / "runs" / "pt"
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if "split" not in r]
    assert losses[-1] < losses[0] - 1.0
    tok = json.loads((run / "model" / "tokenizer.json").read_text())
    assert len(tok["model"]["vocab"]) <= 300  # the tokenizer keel trained, not a borrowed one
    config = json.loads((run / "model" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (64, 2)
    test = json.loads((run / "eval" / "test.json").read_text())
    assert test["perplexity"] < 300 / 2  # far below a uniform guess over the vocabulary
    samples = json.loads((run / "eval" / "samples.json").read_text())["samples"]
    assert len(samples) == 2 and all(s["completion"] for s in samples)
    assert "Sample generations" in (run / "report.html").read_text()
    # keel eval on the frozen test split gives the pipeline's figure; --data reads a text file the same way
    assert json.loads(keel("eval", "runs/pt", "--json", cwd=tmp_path, check=True).stdout)["loss"] == pytest.approx(
        test["loss"]
    )
    held = [{"text": " ".join(rng.choice(words) for _ in range(60)) + "."} for _ in range(8)]
    (tmp_path / "held.jsonl").write_text("\n".join(json.dumps(d) for d in held))
    proc = keel("eval", "runs/pt", "--data", "held.jsonl", cwd=tmp_path, check=True)
    held_eval = json.loads((run / "eval" / "held.json").read_text())
    assert held_eval["tokens"] > 0 and held_eval["perplexity"] < 300 / 2 and "perplexity" in proc.stdout
    bad = keel("validate", "pt.yaml", "model.name=gpt-9", cwd=tmp_path)
    assert bad.returncode == 2 and "size preset" in bad.stderr + bad.stdout and "Traceback" not in bad.stderr


ALIGN = """
name: al
task: causal-lm
model: {name: tiny-llama, max_length: 32}
data: {path: prefs.jsonl, split: {validation: 0.0, test: 0.25, seed: 0}}
align: {method: dpo, reward_steps: 15, reward_lr: 1.0e-3, policy_steps: 6, perplexity_blocks: 2,
        win_rate_prompts: 6, max_new_tokens: 6}
train: {batch_size: 8, lr: 3.0e-3}
"""


@pytest.mark.slow
def test_align_recipe_end_to_end(tmp_path):
    (tmp_path / "prefs.jsonl").write_text("\n".join(json.dumps(p) for p in planted_pairs(48)))
    (tmp_path / "al.yaml").write_text(ALIGN)
    keel("run", "al.yaml", cwd=tmp_path, check=True)
    run = tmp_path / "runs" / "al"
    r = json.loads((run / "eval" / "align.json").read_text())
    assert r["held_out_pairs"] == 12 and r["train_pairs"] == 36
    assert r["reward_model_accuracy"] == 1.0
    assert r["after"]["preference_agreement"] > r["before"]["preference_agreement"]
    assert 0.0 <= r["win_rate"]["win_rate"] <= 1.0 and r["win_rate"]["n"] == 6
    assert r["alignment_tax_pct"] == pytest.approx(
        100 * (r["after"]["shakespeare_perplexity"] / r["before"]["shakespeare_perplexity"] - 1)
    )
    from keel.runtime.load import load_trained

    trained = load_trained(run)  # checksums verified; the merged policy loads as a plain causal LM
    assert "lora" not in json.dumps(list(trained.model.state_dict()))
    assert "Alignment (dpo" in (run / "report.html").read_text()
    held = json.loads(keel("eval", "runs/al", "--json", cwd=tmp_path, check=True).stdout)
    assert held["n"] == 12 and held["reply_tokens"] > 0 and math.isfinite(held["reply_loss"])
    (tmp_path / "new.jsonl").write_text("\n".join(json.dumps(p) for p in planted_pairs(5, seed=7)))
    on_file = json.loads(keel("eval", "runs/al", "--data", "new.jsonl", "--json", cwd=tmp_path, check=True).stdout)
    assert on_file["n"] == 5 and on_file["loss_on"].startswith("reply tokens only")


@pytest.mark.slow
def test_bad_preference_file_is_one_clear_line(tmp_path):
    rows = planted_pairs(8)
    del rows[3]["rejected"]
    (tmp_path / "prefs.jsonl").write_text("\n".join(json.dumps(p) for p in rows))
    (tmp_path / "al.yaml").write_text(ALIGN)
    proc = keel("run", "al.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert "line 4" in proc.stderr + proc.stdout and "rejected" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


SFT = """
name: sft
task: causal-lm
model: {name: tiny-llama, max_length: 64}
data: {path: chats.jsonl, split: {validation: 0.0, test: 0.2, seed: 0}}
sft: {method: lora, lora: {r: 8, alpha: 16.0}}
train: {epochs: 3, batch_size: 8, lr: 1.0e-2}
"""


@pytest.mark.slow
def test_sft_lora_recipe_merges_for_serving(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from keel.models import model_dir

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus one?"},
                {"role": "assistant", "content": f"It is {i + 1}."},
            ]
        }
        for i in range(40)
    ]
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "sft.yaml").write_text(SFT)
    proc = keel("run", "sft.yaml", cwd=tmp_path, check=True)
    assert "eval_loss" not in proc.stdout + proc.stderr  # TRL's raw metric dicts stay out of the console
    assert "keel eval runs/sft --data more_chats.jsonl" in proc.stdout
    assert "could not be built" not in (tmp_path / "runs" / "sft" / "report.html").read_text() + proc.stderr
    run = tmp_path / "runs" / "sft"
    test = json.loads((run / "eval" / "test.json").read_text())
    assert test["loss"] < test["loss_before"]
    # the merged model/ gives the outputs of base + adapter/
    tok = AutoTokenizer.from_pretrained(run / "model")
    ids = torch.tensor([tok("What is 7 plus one?")["input_ids"]])
    merged = AutoModelForCausalLM.from_pretrained(run / "model", use_safetensors=True).eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir("tiny-llama")), run / "adapter"
    ).eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5)
    assert json.loads((run / "model" / "keel.json").read_text())["task"] == "causal-lm"

    # keel eval on the run's test split: the reply-only loss TRL reported at the end of training, recomputed
    proc = keel("eval", "runs/sft", "--json", cwd=tmp_path, check=True)
    again = json.loads(proc.stdout)
    assert again["reply_loss"] == pytest.approx(test["loss"], rel=1e-4) and again["n"] == test["n"]
    assert again["reply_tokens"] < again["tokens"] and again["loss_all_tokens"] > 0
    assert json.loads((run / "eval" / "test.json").read_text())["loss_before"] == test["loss_before"]
    keel("report", "runs/sft", cwd=tmp_path, check=True)
    assert f"on {again['reply_tokens']} reply tokens" in (run / "report.html").read_text()
    # and on another chat file, in the run's own format (prompt + response lines too)
    other = [{"prompt": f"What is {i} plus one?", "response": f"It is {i + 1}."} for i in range(50, 56)]
    (tmp_path / "more.jsonl").write_text("\n".join(json.dumps(r) for r in other))
    proc = keel("eval", "runs/sft", "--data", "more.jsonl", cwd=tmp_path, check=True)
    assert "reply-only loss" in proc.stdout and "6 examples" in proc.stdout
    more = json.loads((run / "eval" / "more.json").read_text())
    assert more["n"] == 6 and math.isfinite(more["reply_loss"]) and more["source"] == "more.jsonl"
    assert "tokenized cache" not in proc.stderr
    bad = keel("eval", "runs/sft", "--data", "more.jsonl", "--label-column", "x", cwd=tmp_path)
    assert bad.returncode == 2 and "no labels" in bad.stderr and "Traceback" not in bad.stderr


def test_builtin_generative_recipes_validate():
    from keel.recipe import load_recipe

    for name in ("pretrain", "align", "sft-lora"):
        r = load_recipe(name)
        assert r.task == "causal-lm"
    assert load_recipe("pretrain").model.init == "scratch"
    assert load_recipe("align").align.method == "dpo"
