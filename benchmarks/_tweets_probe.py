"""What benchmarks/augment.py and active_learning.py share: a seeded sample of the tweets and frozen MiniLM
embeddings (the sentence encoder keel ships, mean-pooled), computed in one place."""

from __future__ import annotations

import numpy as np

LABELS = ["negative", "neutral", "positive"]


def tweets(n: int, seed: int):
    """(texts, label ids) of ``n`` distinct tweets drawn at random with ``seed``."""
    from keel.data.builtin import DATASETS

    spec = DATASETS["tweets-sentiment"]
    frame = spec.read(spec.paths()).dropna(subset=["text", "sentiment"])
    frame = frame.assign(text=frame["text"].astype(str)).drop_duplicates("text")
    frame = frame.sample(n=n, random_state=seed)
    return frame["text"].tolist(), np.array([LABELS.index(v) for v in frame["sentiment"]], dtype=np.int64)


def encoder(model: str = "minilm-l6"):
    from transformers import AutoModel, AutoTokenizer

    from keel.models.registry import model_dir

    path = model_dir(model)
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def embed_all(texts: list[str], enc, max_length: int = 64) -> np.ndarray:
    from keel.label.probe import embed

    model, tok = enc
    return embed(model, tok, texts, max_length, batch_size=64)
