"""What benchmarks/augment.py and active_learning.py share: a seeded sample of the tweets and frozen MiniLM
embeddings (the sentence encoder keel ships, mean-pooled), computed in one place and cached in keel's cache dir
(``embeddings/<sha256 of the encoder's weights, max_length and the texts>.safetensors``): embedding 5,000 tweets
takes minutes on two busy cores, and every benchmark run after the first reads them back in a second."""

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


def embed_cached(texts: list[str], model: str = "minilm-l6", max_length: int = 64) -> np.ndarray:
    """``embed_all`` of ``texts`` with the named encoder, read from keel's cache when these exact texts were
    embedded by these exact weights before (the key hashes the weights file, max_length and every text)."""
    import hashlib

    from safetensors.numpy import load_file, save

    from keel.io import atomic_write_bytes, cache_dir, sha256_file
    from keel.models.registry import model_dir

    folder = model_dir(model)
    weights = sorted(folder.glob("*.safetensors"))
    h = hashlib.sha256("\n".join(sha256_file(w) for w in weights).encode())
    h.update(f"max_length={max_length};n={len(texts)}".encode())
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8")).digest())
    path = cache_dir() / "embeddings" / f"{h.hexdigest()[:32]}.safetensors"
    if path.is_file():
        return load_file(str(path))["x"]
    x = embed_all(texts, encoder(model), max_length).astype(np.float32)  # (N, H)
    atomic_write_bytes(path, save({"x": x}))  # whole or absent: a killed run leaves no half-written cache entry
    return x
