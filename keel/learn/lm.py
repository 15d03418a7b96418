"""A learn round for a causal-LM run: DPO on preference feedback, KTO on thumbs, through keel/align/trainers.py.

The challenger starts from the serving version (the champion), which is also the frozen reference of DPO / KTO.
It is judged beside the champion on two fixed sets:

- old data, the run's held-out split: perplexity on its validation blocks (plain-text runs; the test blocks when
  the validation split holds none), or on the replies of its held-out chats / chosen replies (SFT / aligned runs);
  the challenger may raise it by at most ``learn.max_perplexity_rise`` (relative);
- new data, the feedback's held-out prompts: DPO: preference accuracy (share of pairs whose chosen completion has
  the higher summed log-prob), and the DPO implicit reward margin of the challenger with the champion as reference,
  beta * mean[(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))]; KTO: the mean per-token log-prob of desirable
  completions minus that of undesirable ones. The challenger must gain ``learn.margin`` on the first figure.

There is no replay of old data as in the classifier round: the pull to the champion (``learn.beta``) keeps the
challenger near it, and the perplexity bound checks that it did.

Limits: full fine-tuning (no LoRA); an SFT run kept as an adapter (``sft.merge: false``) has no model/ to learn
from; a sealed run is refused by keel/learn/loop.py.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path
from types import SimpleNamespace

from keel import rundir
from keel.io import atomic_dir, atomic_write_json, atomic_write_text
from keel.learn.record import conclude, now, write_decision
from keel.recipe import Recipe

logger = logging.getLogger(__name__)

NEW_METRIC = {"dpo": "preference accuracy", "kto": "log-prob margin (desirable - undesirable, nats per token)"}


def lm_round(run_dir: Path, recipe: Recipe, cfg, state: dict, n: int) -> dict:
    """One round on a causal-LM run (the caller holds the run's lock); returns the decision, written to the run."""
    from transformers import AutoTokenizer

    from keel.align.trainers import quiet
    from keel.learn.generations import generation_feedback, kto_data, pick_method
    from keel.serve.feedback import read_rows
    from keel.train.engine import set_threads

    quiet()
    set_threads(recipe)
    champion = state["current"]
    champ_model = rundir.version_dir(run_dir, champion) / "model"
    tokenizer = AutoTokenizer.from_pretrained(champ_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = read_rows(rundir.feedback_db(run_dir), after=state["learned_through"])
    fb = generation_feedback(rows, tokenizer, cfg.holdout)
    method = pick_method(fb, cfg.method)
    train, heldout = (fb.pairs, fb.pairs_heldout) if method == "dpo" else kto_data(fb)
    decision = {
        "round": n,
        "time": now(),
        "champion": champion,
        "method": method,
        "rule": {
            "margin": cfg.margin,
            "max_perplexity_rise": cfg.max_perplexity_rise,
            "metric": NEW_METRIC[method],
        },
        "data": {
            "feedback_rows": fb.rows,
            "feedback_after_id": state["learned_through"],
            "feedback_through_id": fb.last_id,
            "feedback_train": len(train),
            "feedback_heldout": len(heldout),
            "left_out": fb.unusable,
        },
    }
    what = "preference pair(s)" if method == "dpo" else "thumbs / preference completion(s)"
    usable = len(train) + len(heldout)
    short = _short(method, heldout)
    if usable < cfg.min_feedback or not train or short:
        decision.update(
            action="skipped",
            why=f"{usable} usable {what} since the last promotion ({len(train)} to train on, {len(heldout)} held "
            f"out); a {method.upper()} round needs at least learn.min_feedback={cfg.min_feedback}, some to train on "
            f"and {short or 'some held out'}",
        )
        decision["file"] = str(write_decision(run_dir, decision))
        return decision
    version = rundir.version_name(n)
    logger.info(f"learn round {n}: {method.upper()} challenger {version} from {champion} on {len(train)} {what}")
    final, policy, summary = _train(run_dir, version, recipe, cfg, champion, method, train, tokenizer, n)
    figures = judge(run_dir, recipe, cfg, method, champ_model, policy, tokenizer, heldout)
    promote, why = decide_lm(figures, cfg.margin, cfg.max_perplexity_rise)
    decision.update(
        action="promoted" if promote else "refused",
        why=why,
        challenger=version,
        figures=figures,
        train={k: summary.get(k) for k in ("steps", "final_loss")},
    )
    return conclude(run_dir, decision, promote, state, final, fb.last_id, cfg.keep)


def _short(method: str, heldout: list[dict]) -> str:
    """What the held-out part lacks to be judged on ('' when nothing)."""
    if method == "kto" and not ({ex["label"] for ex in heldout} >= {True, False}):
        return "held-out desirable and undesirable completions both"
    return "" if heldout else "some held out"


def _train(run_dir, version, recipe, cfg, champion, method, train, tokenizer, n):
    """The challenger, trained from the champion and saved into learn/<version>/ (atomically)."""
    from keel.align import trainers
    from keel.train.engine import save_final_model

    champ_model = (rundir.version_dir(run_dir, champion) / "model").resolve()
    data_file = rundir.learn_dir(run_dir) / "data" / f"{version}.jsonl"  # the exact rows it trained on
    data_file.parent.mkdir(parents=True, exist_ok=True)
    order = list(train)
    random.Random(cfg.seed + n).shuffle(order)  # KTO reads its data in order (TRL's sequential sampler)
    atomic_write_text(data_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in order))
    tr = recipe.train
    batch = min(tr.batch_size, max(2, len(order)))
    steps = cfg.max_steps or cfg.epochs * math.ceil(len(order) / batch)
    lr = cfg.lr or tr.lr
    options = SimpleNamespace(beta=cfg.beta, lora=None)
    train_fn = trainers.train_dpo if method == "dpo" else trainers.train_kto
    policy, logs = train_fn(
        champ_model,
        tokenizer,
        order,
        options,
        steps,
        lr,
        batch,
        cfg.seed + n,
        recipe.model.max_length,
        tr.mixed_precision,
    )
    policy = trainers.merged(policy).eval()
    ch_recipe = challenger_recipe(recipe, champ_model, data_file.resolve())
    losses = [r["loss"] for r in logs if "loss" in r]
    summary = {
        "steps": steps,
        "final_loss": losses[-1] if losses else None,
        "best_step": steps,
        "selection_metric": "loss",
        "best_metric": None,
        "labels": [],
        "method": method,
    }
    final = rundir.version_dir(run_dir, version)
    with atomic_dir(final) as work:
        atomic_write_text(work / "recipe.yaml", ch_recipe.to_yaml())
        save_final_model(
            policy, tokenizer, work / "model", ch_recipe, summary, extra={"learned_from": champion, "version": version}
        )
        atomic_write_json(work / "train.json", summary)
        trainers.write_logs(work, logs)
    return final, policy, summary


def challenger_recipe(recipe: Recipe, champion_model: Path, data_file: Path) -> Recipe:
    """The run's recipe, its model the champion's weights and its data the feedback rows the challenger saw."""
    return recipe.model_copy(
        update={
            "model": recipe.model.model_copy(update={"name": str(champion_model), "init": "pretrained"}),
            "data": recipe.data.model_copy(update={"name": None, "path": str(data_file)}),
            "audit": None,
            "compress": None,
            "output": recipe.output.model_copy(update={"dir": None}),
        }
    )


def judge(run_dir, recipe, cfg, method, champ_model, policy, tokenizer, heldout) -> dict:
    """Champion vs challenger on the old data (perplexity) and on the held-out feedback (see the module doc)."""
    from keel.align.trainers import load_policy

    champion = load_policy(champ_model).to(next(policy.parameters()).device).eval()
    old = {"set": "the run's held-out split", "metric": "perplexity"}
    source = old_data(run_dir, recipe, tokenizer)
    if source is None:
        old.update(champion=None, challenger=None, n=0)
    else:
        old["set"] = source[0]
        a, b = (_perplexity(m, source, recipe, tokenizer) for m in (champion, policy))
        old.update(champion=a, challenger=b, n=len(source[2]))
    new = {"set": "the feedback's held-out part", "metric": NEW_METRIC[method], "n": len(heldout)}
    if method == "dpo":
        c0, r0 = _pair_logprobs(champion, tokenizer, heldout)
        c1, r1 = _pair_logprobs(policy, tokenizer, heldout)
        new.update(champion=_accuracy(c0, r0), challenger=_accuracy(c1, r1))
        margins = [(a1 - a0) - (b1 - b0) for a0, b0, a1, b1 in zip(c0, r0, c1, r1)]
        new["reward_margin"] = round(cfg.beta * sum(margins) / len(margins), 6)
    else:
        new.update(
            champion=_kto_margin(champion, tokenizer, heldout), challenger=_kto_margin(policy, tokenizer, heldout)
        )
    return {"old": old, "new": new}


def old_data(run_dir: Path, recipe: Recipe, tokenizer):
    """(name, kind, data) of the run's held-out split: text blocks, or prompt + reply examples; None if empty."""
    from keel.evaluate import _lm_examples, lm_data_kind

    kind = lm_data_kind(recipe)
    if kind == "text":
        from keel.data.prepare import prepare_data

        splits = prepare_data(recipe, tokenizer, run_dir).splits
        for name in ("validation", "test"):
            if len(splits[name]):
                return f"the run's frozen {name} split", "blocks", splits[name]
        return None
    try:
        examples = _lm_examples(SimpleNamespace(recipe=recipe, tokenizer=tokenizer), kind, None)
    except Exception as e:  # no held-out split (data.split.test: 0): judged on the feedback alone
        logger.warning(f"no held-out {kind} examples to judge the old data on ({e}); judging on the feedback alone")
        return None
    return (
        f"the run's held-out {'chats' if kind == 'chat' else 'preference pairs (chosen replies)'}",
        "replies",
        examples,
    )


def _perplexity(model, source, recipe, tokenizer) -> float:
    import torch

    from keel.tasks import causal_lm

    _, kind, data = source
    device = next(model.parameters()).device
    if kind == "blocks":
        return causal_lm.evaluate(model, data, tokenizer, recipe.train.eval_batch_size, torch.device(device))[
            "perplexity"
        ]
    figures = causal_lm.evaluate_replies(
        model, tokenizer, data, recipe.model.max_length, recipe.train.eval_batch_size, device
    )
    return figures["reply_perplexity"]


def _pair_logprobs(model, tokenizer, pairs: list[dict]) -> tuple[list[float], list[float]]:
    from keel.align.lm_bias import continuation_logprobs

    prompts = [p["prompt"] for p in pairs]
    chosen, _ = continuation_logprobs(model, tokenizer, prompts, [p["chosen"] for p in pairs])
    rejected, _ = continuation_logprobs(model, tokenizer, prompts, [p["rejected"] for p in pairs])
    return chosen, rejected


def _accuracy(chosen: list[float], rejected: list[float]) -> float:
    return sum(c > r for c, r in zip(chosen, rejected)) / len(chosen)


def _kto_margin(model, tokenizer, examples: list[dict]) -> float:
    """Mean per-token log-prob of the desirable completions minus that of the undesirable ones."""
    from keel.align.lm_bias import continuation_logprobs

    sums, counts = continuation_logprobs(
        model, tokenizer, [e["prompt"] for e in examples], [e["completion"] for e in examples]
    )
    per_token = [s / max(c, 1) for s, c in zip(sums, counts)]
    good = [v for v, e in zip(per_token, examples) if e["label"]]
    bad = [v for v, e in zip(per_token, examples) if not e["label"]]
    return round(sum(good) / len(good) - sum(bad) / len(bad), 6)


def decide_lm(figures: dict, margin: float, max_rise: float) -> tuple[bool, str]:
    """Promote only when the challenger gains at least ``margin`` on the held-out feedback and raises the old data's
    perplexity by at most ``max_rise`` (relative; a run without a held-out split is judged on the feedback alone).
    Adds the gain and the rise to ``figures``; returns (promote, why)."""
    new, old = figures["new"], figures["old"]
    gain = new["challenger"] - new["champion"]
    rise = old["challenger"] / old["champion"] - 1 if old["n"] else 0.0
    new["gain"], old["rise"] = round(gain, 6), round(rise, 6)
    if gain < margin - 1e-9:
        return False, f"{new['metric']} gains {gain:+.4f} on the feedback's held-out part, below learn.margin={margin}"
    if rise > max_rise + 1e-9:
        return False, (f"perplexity on {old['set']} rises {100 * rise:.2f}%, over learn.max_perplexity_rise={max_rise}")
    return True, (
        f"{gain:+.4f} {new['metric']} on the feedback's held-out part (learn.margin={margin}), perplexity "
        f"{100 * rise:+.2f}% on the old data (learn.max_perplexity_rise={max_rise})"
    )
