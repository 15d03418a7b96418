"""Chat / instruction JSONL for SFT: each line one example, read into prompt + completion, split for training and test.

{"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant", "content": ...}]}   or
{"prompt": "...", "response": "..."}   (also "completion" for "response")
"""

from __future__ import annotations

import random
from pathlib import Path

from keel.errors import DataError


def read_chat_jsonl(path: str, use_chat: bool) -> list[dict]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data.path: file '{path}' not found; SFT data is JSONL with messages, or prompt + response")
    from keel.data.load import read_jsonl

    rows = [_example(r, use_chat, f"{path} line {n}") for n, r in read_jsonl(p)]
    if len(rows) < 2:
        raise DataError(f"{path}: {len(rows)} examples; SFT needs at least 2")
    return rows


def _example(r: dict, use_chat: bool, where: str) -> dict:
    if isinstance(r.get("messages"), list) and r["messages"]:
        msgs = r["messages"]
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in msgs):
            raise DataError(f"{where}: every message needs a role and a text content")
        if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
            raise DataError(f"{where}: messages must end with an assistant message after at least one other")
        prompt, completion = msgs[:-1], msgs[-1:]
    else:
        response = r.get("response", r.get("completion"))
        if not isinstance(r.get("prompt"), str) or not isinstance(response, str):
            raise DataError(f"{where}: needs 'messages' (a list), or 'prompt' and 'response' strings")
        prompt, completion = [{"role": "user", "content": r["prompt"]}], [{"role": "assistant", "content": response}]
    if use_chat:
        return {"prompt": prompt, "completion": completion}
    text = "\n".join(f"{m['role']}: {m['content']}" for m in prompt) + "\nassistant:"
    return {"prompt": text, "completion": " " + completion[0]["content"]}


def split_examples(rows: list[dict], data) -> tuple[list[dict], list[dict]]:
    """The training and test examples of an SFT run (seeded shuffle, data.split); `keel eval` reads the same test."""
    order = list(range(len(rows)))
    random.Random(data.split.seed).shuffle(order)
    n_test, n_val = round(data.split.test * len(rows)), round(data.split.validation * len(rows))
    test = [rows[i] for i in order[:n_test]]
    train = [rows[i] for i in order[n_test + n_val :]][: data.max_train_samples]
    return train, test
