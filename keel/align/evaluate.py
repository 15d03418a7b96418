"""Before vs after alignment, on held-out pairs only: bias, reward win rate, and the alignment tax.

- preference agreement: share of held-out pairs whose chosen text the policy finds more likely
  (for CrowS-Pairs also the stereotype score, 50 is ideal; keel.align.lm_bias);
- win rate: the reward model compares the aligned policy's greedy continuation of each held-out
  prompt with the reference's (ties count half);
- perplexity on held-out Shakespeare (a corpus neither model was aligned on): the alignment tax.
"""

from __future__ import annotations

import math

import torch

from keel.align.lm_bias import continuation_logprobs, crows_pairs_score
from keel.align.trainers import reward_scores


def preference_agreement(model, tokenizer, pairs: list[dict]) -> float:
    chosen, _ = continuation_logprobs(model, tokenizer, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected, _ = continuation_logprobs(model, tokenizer, [p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    return sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)


def policy_metrics(model, tokenizer, pairs: list[dict], blocks: list[list[int]]) -> dict:
    out = {"preference_agreement": preference_agreement(model, tokenizer, pairs)}
    if all("sent_more" in p for p in pairs):
        out["crows_pairs"] = crows_pairs_score(model, tokenizer, pairs)
    if blocks:
        out["shakespeare_perplexity"] = perplexity(model, blocks)
    return out


@torch.no_grad()
def perplexity(model, blocks: list[list[int]], batch_size: int = 8) -> float:
    model.eval()
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = torch.tensor(blocks[start : start + batch_size], device=device)  # (B, T)
        loss = model(input_ids=ids, labels=ids).loss.float().item()
        k = ids.numel() - ids.shape[0]
        total, n = total + loss * k, n + k
    return math.exp(total / n)


def shakespeare_blocks(tokenizer, n: int, length: int) -> list[list[int]]:
    """``n`` blocks of ``length`` tokens from the last plays (alphabetically) of the built-in corpus."""
    if n == 0:
        return []
    from keel.data.builtin import DATASETS

    spec = DATASETS["shakespeare"]
    stream: list[int] = []
    for path in reversed(spec.paths()):
        stream += tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        if len(stream) >= n * length:
            break
    return [stream[i * length : (i + 1) * length] for i in range(min(n, len(stream) // length))]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    model.eval()
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(
                prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            )
            gen = model.generate(
                **{k: v.to(device) for k, v in enc.items()},
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def win_rate(reward_model, tokenizer, prompts: list[str], policy_out: list[str], ref_out: list[str]) -> dict:
    a = reward_scores(reward_model, tokenizer, [p + c for p, c in zip(prompts, policy_out)])
    b = reward_scores(reward_model, tokenizer, [p + c for p, c in zip(prompts, ref_out)])
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b))
    return {
        "win_rate": wins / len(prompts),
        "n": len(prompts),
        "mean_reward_policy": sum(a) / len(a),
        "mean_reward_reference": sum(b) / len(b),
    }


def win_rate_prompts(pairs: list[dict], n: int) -> list[str]:
    """Distinct held-out prompts, longest shared openings first (they say the most about the continuation)."""
    seen, out = set(), []
    for p in sorted(pairs, key=lambda p: -p.get("shared_words", len(p["prompt"]))):
        if p["prompt"] not in seen:
            seen.add(p["prompt"])
            out.append(p["prompt"])
    return out[:n]
