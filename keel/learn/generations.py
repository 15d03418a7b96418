"""What a causal LM learns from: feedback on its generations, as TRL's datasets.

Preference rows -> DPO pairs (prompt, chosen, rejected); thumbs rows -> KTO examples (prompt, completion, label:
True for up). The prompt is the text the model was served, rebuilt from the stored request: a completion's prompt
after the tokenizer's BOS text (the server tokenized it with special tokens), a chat through the chat template
with the generation prompt (keel.serve.engines.chat_text, as the server did). The latest feedback on the same
prompt and completion(s) wins. Prompts are split by their hash into a training part and a held-out part that stays
held out in every round (keel.learn.data.heldout_share).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from keel.errors import KeelError
from keel.learn.data import heldout_share

ROUTES = ("completions", "chat")
KINDS = ("thumbs", "preference")


@dataclass
class GenerationFeedback:
    pairs: list[dict] = field(default_factory=list)  # DPO: prompt, chosen, rejected (training part)
    pairs_heldout: list[dict] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)  # KTO: prompt, completion, label (training part)
    examples_heldout: list[dict] = field(default_factory=list)
    rows: int = 0  # thumbs and preference rows read (new since the last promotion)
    unusable: dict = field(default_factory=dict)  # why rows were left out -> how many
    last_id: int = 0


def served_prompt(tokenizer, route: str, input_text: str) -> str:
    """The prompt text the server generated from (keel/serve/generate.py stores the request's prompt, or its chat
    messages as JSON)."""
    from keel.align.lm_bias import lead_token
    from keel.serve.engines import chat_text

    if route == "chat":
        text, templated = chat_text(tokenizer, json.loads(input_text))
        return text if templated else lead_token(tokenizer) + text
    return lead_token(tokenizer) + input_text


def no_text_error(n: int) -> KeelError:
    return KeelError(
        f"{n} feedback row(s) hold only the SHA-256 of their texts (serve.feedback.store_text was false when they "
        "were sent), and a model cannot learn from hashes; set serve.feedback.store_text: true in the run's "
        "recipe.yaml and restart the server (rows stored without their texts cannot be recovered)"
    )


def generation_feedback(rows: list[dict], tokenizer, holdout: float) -> GenerationFeedback:
    """Rows of the feedback database -> DPO pairs and KTO examples, each split into training and held-out parts.
    Raises KeelError with the fix when rows exist but every one lacks its texts."""
    unusable = {"no_text": 0, "not_generation": 0}
    latest: dict[tuple, dict] = {}
    read = [r for r in rows if r["kind"] in KINDS]
    for r in read:
        texts = [r["input_text"], r["output_text"]] + ([r["rejected_text"]] if r["kind"] == "preference" else [])
        if r["route"] not in ROUTES:
            unusable["not_generation"] += 1
        elif any(t is None for t in texts):
            unusable["no_text"] += 1
        else:
            key = (r["kind"], r["input_sha256"], r["output_sha256"], r.get("rejected_sha256"))
            latest[key] = r
    if read and not latest and unusable["no_text"]:
        raise no_text_error(unusable["no_text"])
    out = GenerationFeedback(
        rows=len(read),
        unusable={k: v for k, v in unusable.items() if v},
        last_id=max((r["id"] for r in read), default=0),
    )
    for r in latest.values():
        prompt = served_prompt(tokenizer, r["route"], r["input_text"])
        held = heldout_share(r["input_sha256"]) < holdout  # by prompt: its completions never cross the split
        if r["kind"] == "preference":
            pair = {"prompt": prompt, "chosen": r["output_text"], "rejected": r["rejected_text"]}
            (out.pairs_heldout if held else out.pairs).append(pair)
        else:
            ex = {"prompt": prompt, "completion": r["output_text"], "label": r["thumbs"] == "up"}
            (out.examples_heldout if held else out.examples).append(ex)
    return out


def pick_method(fb: GenerationFeedback, method: str) -> str:
    """``learn.method`` -> dpo or kto: auto is dpo when the feedback is preferences only, else kto."""
    if method != "auto":
        return method
    return "kto" if fb.examples or fb.examples_heldout else "dpo"


def kto_data(fb: GenerationFeedback) -> tuple[list[dict], list[dict]]:
    """KTO's training and held-out examples: thumbs, plus each preference pair as one desirable and one
    undesirable completion of its prompt."""

    def unpaired(pairs):
        return [
            {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
            for p in pairs
            for side in ("chosen", "rejected")
        ]

    return fb.examples + unpaired(fb.pairs), fb.examples_heldout + unpaired(fb.pairs_heldout)
