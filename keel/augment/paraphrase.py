"""Paraphrases by a built-in causal LM (``data.augment.ops: [paraphrase]``), only when a recipe asks for them.

A small instruction model (SmolLM2-135M-Instruct by default) rewrites each picked text; nothing checks that a
paraphrase keeps its label, which is why keel never does this unasked and caps how many texts it rewrites.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

PROMPT = "Rewrite this text in other words, keeping its meaning and tone. Reply with the rewritten text only.\n\n{text}"


def paraphrase(texts: list[str], model_name: str, seed: int, batch_size: int = 8) -> list[str]:
    """One paraphrase per text (an empty string where the model gave nothing usable), in order."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from keel.models.registry import model_dir

    path = model_dir(model_name)
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    logger.info(f"data.augment: paraphrasing {len(texts)} training texts with {model_name}")
    torch.manual_seed(seed)
    out: list[str] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        prompts = [_prompt(tok, t) for t in chunk]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        longest = max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in chunk)
        with torch.no_grad():
            gen = model.generate(
                **enc,
                max_new_tokens=min(2 * longest + 8, 256),
                do_sample=True,
                top_p=0.9,
                temperature=0.7,
                pad_token_id=tok.pad_token_id,
            )  # (B, prompt + new)
        for row in gen[:, enc["input_ids"].shape[1] :]:
            text = tok.decode(row, skip_special_tokens=True).strip().splitlines()
            out.append(text[0].strip() if text else "")
    return out


def _prompt(tok, text: str) -> str:
    msg = PROMPT.format(text=text)
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": msg}], tokenize=False, add_generation_prompt=True)
    return msg + "\n\n"
