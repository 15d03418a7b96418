"""Explanations: integrated-gradients completeness on a tiny model, attention rollout, faithfulness, explain_texts."""

import numpy as np
import pytest
import torch

from keel.recipe import ExplainConfig

pytestmark = pytest.mark.slow  # trains a tiny model for the explanations


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoTokenizer

    from keel.models import model_dir
    from keel.tasks import get_task

    torch.manual_seed(0)
    path = model_dir("tiny-bert")
    model = get_task("classification").build_model(path, ["neg", "pos"])
    tok = AutoTokenizer.from_pretrained(path)
    # a random encoder scores every text alike; a few steps on a toy task make the words matter
    texts, labels = [], []
    for i, (g, b) in enumerate(
        zip(["great", "lovely", "happy", "excellent"] * 8, ["awful", "sad", "broken", "terrible"] * 8)
    ):
        texts += [f"the ride was {g} number {i}", f"the ride was {b} number {i}"]
        labels += [1, 0]
    enc = tok(texts, return_tensors="pt", padding=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):  # stop well before saturation: a saturated model makes IG a step function
        loss = model(**enc, labels=torch.tensor(labels)).loss
        if loss.item() < 0.45:
            break
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model, tok


TEXTS = ["the car was great number 5", "the bus was awful and broken", "a ride", "my trip was lovely today"]


def _completeness_gap(model, tok, n_steps):
    from keel.trust.explain import _encode, integrated_gradients

    exps = integrated_gradients(model, tok, TEXTS, n_steps=n_steps)
    enc = _encode(tok, TEXTS, None)
    rel = []
    for b, e in enumerate(exps):
        ids = enc["input_ids"][b : b + 1, : len(e.tokens)]
        special = torch.tensor([not c for c in e.content]).unsqueeze(0)
        base = torch.where(special, ids, torch.full_like(ids, tok.pad_token_id))
        with torch.no_grad():
            p = model(input_ids=ids).logits.softmax(-1)[0]
            p0 = model(input_ids=base).logits.softmax(-1)[0]
        target = model.config.label2id[e.label]
        change = float(p[target] - p0[target])  # what the attributions must add up to
        assert abs(change) > 1e-3
        rel.append(abs(sum(e.attributions) - change) / abs(change))
        assert e.delta == pytest.approx(sum(e.attributions) - change, abs=1e-4)  # Captum's sign
    return max(rel)


def test_integrated_gradients_completeness_within_one_percent(tiny):
    model, tok = tiny
    assert _completeness_gap(model, tok, 64) < 0.01


def test_explanations_shape_and_targets(tiny):
    from keel.trust.explain import explain_texts, integrated_gradients

    model, tok = tiny
    pairs = explain_texts(model, tok, TEXTS, n_steps=8)
    assert len(pairs) == len(TEXTS)
    for tokens, attrs in pairs:
        assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and len(tokens) == len(attrs)
        assert attrs[0] == 0.0 and attrs[-1] == 0.0  # special tokens equal the baseline: no attribution
    a = integrated_gradients(model, tok, TEXTS[:1], targets=[0], n_steps=16)[0]
    b = integrated_gradients(model, tok, TEXTS[:1], targets=[1], n_steps=16)[0]
    assert a.label == "neg" and b.label == "pos"
    # two classes: p(neg) = 1 - p(pos), so the attributions toward them are opposite
    assert np.allclose(a.attributions, -np.asarray(b.attributions), atol=1e-4)


def test_attention_rollout_rows_are_distributions(tiny):
    from keel.trust.explain import _eager_attention, attention_rollout

    model, tok = tiny
    _eager_attention(model)
    roll = attention_rollout(model, tok, TEXTS)
    assert roll is not None and len(roll) == len(TEXTS)
    for r in roll:
        assert sum(r) == pytest.approx(1.0, abs=1e-4) and min(r) >= 0


def test_faithfulness_prefers_attributed_tokens_over_random(tiny):
    from keel.trust.explain import explain, faithfulness, global_importance

    model, tok = tiny
    texts = [
        f"{a} {b} {c} and {d}"
        for a, b, c, d in zip(
            ["great", "awful", "lovely", "broken", "happy", "sad", "fine", "bad"] * 2,
            ["car", "bus", "ride", "trip", "road", "taxi", "train", "drive"] * 2,
            ["today", "again", "now", "then", "here", "there", "still", "ever"] * 2,
            ["more", "less", "some", "all", "none", "most", "few", "many"] * 2,
        )
    ]
    cfg = ExplainConfig(n_steps=16, top_k=1)
    exps = explain(model, tok, texts, cfg, rollout=False)
    f = faithfulness(model, tok, exps, k=1, seed=0)
    assert f["n"] == len(texts)
    # deleting the most positively attributed token hurts more than deleting a random one
    assert f["comprehensiveness"] > f["comprehensiveness_random"]
    # and the ranking is what matters: deleting the *least* attributed token instead does not
    worst = [type(e)(**{**e.to_json(), "attributions": [-a for a in e.attributions]}) for e in exps]
    assert faithfulness(model, tok, worst, k=1, seed=0)["comprehensiveness"] < f["comprehensiveness"]
    gi = global_importance(exps, top=3, min_count=1)
    assert gi and all(len(rows) <= 3 for rows in gi.values())


def test_probabilities_come_back_in_text_order(tiny):
    from keel.trust.explain import probabilities

    model, tok = tiny
    texts = [t * (1 + i % 3) for i, t in enumerate(TEXTS * 3)]  # lengths out of order
    batched = probabilities(model, tok, texts, max_length=64, batch_size=5)
    alone = np.concatenate([probabilities(model, tok, [t], max_length=64) for t in texts])
    assert batched.shape == (len(texts), 2)
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    assert not np.allclose(batched[0], batched[1])  # the texts do score differently
