"""`keel run` for recipes with an `align:` section (SFT is keel/sft).

Alignment, as a linear script: preferences -> reward model (held-out pairwise accuracy) -> the reference
policy's figures -> DPO or RL -> the aligned policy's figures -> model/ (LoRA merged, safetensors) ->
eval/align.json -> report. Resuming an interrupted alignment run is not supported: start it again.
"""

from __future__ import annotations

import logging
from pathlib import Path

from keel.align import ScriptTrainer
from keel.io import atomic_dir, atomic_write_json
from keel.recipe import Recipe

logger = logging.getLogger(__name__)


def align_run(recipe: Recipe, run_dir: Path) -> dict:
    from keel.align import evaluate as ev
    from keel.align import trainers
    from keel.align.lm_bias import lead_token
    from keel.align.prefs import load_preferences
    from keel.train.engine import save_final_model

    cfg, tr = recipe.align, recipe.train
    base, tokenizer = trainers.load_base(recipe)
    prefs = load_preferences(recipe.data, lead_token(tokenizer))
    train_pairs, held_out = prefs["train"], prefs["test"]
    if cfg.eval_pairs:
        held_out = held_out[: cfg.eval_pairs]
    logger.info(f"preferences: {len(train_pairs)} training pairs, {len(held_out)} held-out pairs (split by pair)")
    logs: list[dict] = []

    # 1. reward model, and its accuracy on held-out pairs
    rm, rm_logs = trainers.train_reward_model(
        base,
        tokenizer,
        train_pairs,
        cfg.reward_steps,
        cfg.reward_lr,
        tr.batch_size,
        tr.seed,
        recipe.model.max_length,
        tr.mixed_precision,
        cfg.reward_layers,
    )
    logs += rm_logs
    rm_accuracy = trainers.pairwise_accuracy(rm, tokenizer, held_out)
    logger.info(f"reward model: held-out pairwise accuracy {rm_accuracy:.3f}")
    with atomic_dir(run_dir / "reward_model") as tmp:
        rm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    # 2. the reference policy's figures
    blocks = ev.shakespeare_blocks(tokenizer, cfg.perplexity_blocks, recipe.model.max_length)
    prompts = ev.win_rate_prompts(held_out, cfg.win_rate_prompts)
    reference = trainers.load_policy(base)
    before = ev.policy_metrics(reference, tokenizer, held_out, blocks)
    ref_out = ev.generate(reference, tokenizer, prompts, cfg.max_new_tokens)
    del reference

    # 3. the policy
    if cfg.method == "dpo":
        policy, p_logs = trainers.train_dpo(
            base,
            tokenizer,
            train_pairs,
            cfg,
            cfg.policy_steps,
            tr.lr,
            tr.batch_size,
            tr.seed,
            recipe.model.max_length,
            tr.mixed_precision,
        )
    else:
        rl_prompts = sorted({p["prompt"] for p in train_pairs})
        policy, p_logs = trainers.train_rl(
            base, tokenizer, rl_prompts, rm, cfg, cfg.policy_steps, tr.lr, tr.seed, tr.mixed_precision
        )
    logs += p_logs
    policy = trainers.merged(policy).eval()

    # 4. the aligned policy's figures, side by side
    after = ev.policy_metrics(policy, tokenizer, held_out, blocks)
    pol_out = ev.generate(policy, tokenizer, prompts, cfg.max_new_tokens)
    wins = ev.win_rate(rm, tokenizer, prompts, pol_out, ref_out)
    result = {
        "method": cfg.method,
        "beta": cfg.beta,
        "lora": cfg.lora is not None,
        "held_out_pairs": len(held_out),
        "train_pairs": len(train_pairs),
        "reward_model_accuracy": rm_accuracy,
        "before": before,
        "after": after,
        "win_rate": wins,
        "samples": [
            {"prompt": p, "reference": r, "aligned": a} for p, r, a in list(zip(prompts, ref_out, pol_out))[:8]
        ],
    }
    if "shakespeare_perplexity" in before:
        result["alignment_tax_pct"] = 100 * (after["shakespeare_perplexity"] / before["shakespeare_perplexity"] - 1)
    if "crows_pairs" in before:
        result["stereotype_score_before"] = before["crows_pairs"]["stereotype_score"]
        result["stereotype_score_after"] = after["crows_pairs"]["stereotype_score"]
        result["closer_to_50_points"] = before["crows_pairs"]["distance_to_50"] - after["crows_pairs"]["distance_to_50"]
    atomic_write_json(run_dir / "eval" / "align.json", result)
    trainers.write_logs(run_dir, logs)
    summary = {
        "steps": cfg.policy_steps,
        "reward_steps": cfg.reward_steps,
        "best_step": cfg.policy_steps,
        "selection_metric": "loss",
        "best_metric": None,
        "labels": [],
        "data": {
            "source": recipe.data.name or recipe.data.path,
            "counts": {"train": len(train_pairs), "validation": len(prefs["validation"]), "test": len(held_out)},
        },
    }
    save_final_model(policy, tokenizer, run_dir / "model", recipe, summary)
    atomic_write_json(run_dir / "train.json", summary)
    _print(result)
    return summary


def _print(r: dict) -> None:
    from keel.progress import out

    if "stereotype_score_before" in r:
        out.print(
            f"CrowS-Pairs stereotype score (held-out, 50 is ideal): {r['stereotype_score_before']:.1f} -> "
            f"{r['stereotype_score_after']:.1f} ({r['closer_to_50_points']:+.1f} points closer to 50)"
        )
    out.print(
        f"held-out preference agreement: {r['before']['preference_agreement']:.3f} -> {r['after']['preference_agreement']:.3f}; "
        f"reward model accuracy {r['reward_model_accuracy']:.3f}; win rate vs reference {r['win_rate']['win_rate']:.3f}"
    )
    if "alignment_tax_pct" in r:
        out.print(
            f"Shakespeare perplexity: {r['before']['shakespeare_perplexity']:.2f} -> "
            f"{r['after']['shakespeare_perplexity']:.2f} (alignment tax {r['alignment_tax_pct']:+.1f}%)"
        )


class AlignTrainer(ScriptTrainer):
    """Reward model / DPO / GRPO / RLOO (align_run above) as keel's Trainer; align_run seals RUN/model itself."""

    script = staticmethod(align_run)
