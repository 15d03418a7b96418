"""Shared fixtures: offline environment, a private keel cache, and a helper that runs the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
os.environ.update(OFFLINE)


@pytest.fixture(scope="session", autouse=True)
def keel_cache(tmp_path_factory) -> Path:
    """One keel cache for the session (tiny models, tokenized data), away from the user's own."""
    path = tmp_path_factory.mktemp("keel-cache")
    os.environ["KEEL_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def keel_logging() -> None:
    """keel's log lines on stderr as the CLI prints them, for the tests that call keel in-process and read capsys."""
    from keel.progress import setup_logging

    setup_logging()


# The fast lane (`pytest -m "not slow"`) spawns no `keel` process: a test that does must be marked slow.
_running_slow_test = True


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    global _running_slow_test
    _running_slow_test = item.get_closest_marker("slow") is not None


def keel(
    *args: str, cwd: Path, check: bool = False, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m keel ARGS` as a user would, in ``cwd``."""
    if not _running_slow_test:
        pytest.fail(
            "this test runs `keel` in a subprocess: mark it slow (pytestmark = pytest.mark.slow, or "
            "@pytest.mark.slow) so that `make test-fast` skips it",
            pytrace=False,
        )
    full_env = {**os.environ, **OFFLINE, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "keel", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"keel {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


TINY_RECIPE = """
name: tiny
task: classification
model: {{name: tiny-bert, max_length: 32}}
data:
  path: {data}
  split: {{validation: 0.2, test: 0.2, seed: 0}}
train:
  epochs: {epochs}
  batch_size: 8
  lr: 3.0e-3
  warmup_ratio: 0.0
  checkpoint_every: {every}
  keep_last_k: 3
"""


def write_toy_csv(path: Path, n: int = 120, seed: int = 0) -> Path:
    """A learnable toy sentiment set: the label is given away by a word."""
    import random

    rng = random.Random(seed)
    good = ["great", "lovely", "excellent", "wonderful", "happy"]
    bad = ["awful", "terrible", "horrible", "sad", "broken"]
    filler = ["the car", "this ride", "my trip", "the service", "that road", "our drive", "the bus", "a taxi"]
    lines = ["text,label"]
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        word = rng.choice(good if label == "pos" else bad)
        lines.append(f"{rng.choice(filler)} was {word} number {i},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def toy_csv(tmp_path) -> Path:
    return write_toy_csv(tmp_path / "toy.csv")


@pytest.fixture
def tiny_recipe(tmp_path, toy_csv):
    def make(epochs: int = 2, every: int = 0, name: str = "tiny.yaml") -> Path:
        p = tmp_path / name
        p.write_text(TINY_RECIPE.format(data=toy_csv, epochs=epochs, every=every))
        return p

    return make


# -- tiny models for the serving tests, shared by test_serve_batching and test_serve_generation_faults --------


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a busy 2-core machine, OpenMP barriers make a tiny model's steps 10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_bert_classifier():
    """A random 2-layer BERT classifier (hidden 32, vocab 120, 3 labels), seeded: the packed-export tests' model."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


def tiny_llama(vocab_size: int, max_position_embeddings: int = 512, **config):
    """A random 2-layer Llama (hidden 64) with large weights, seeded: the model of `tiny_lm`, for any tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.3,
        tie_word_embeddings=False,
        max_position_embeddings=max_position_embeddings,
        **config,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def tiny_lm():
    """A random 2-layer Llama with large weights: unlike the registry's tiny-llama (whose greedy output
    repeats one token whatever the context), every token here depends on the whole context, so a wrong
    mask, position or cache row changes the output."""
    from transformers import AutoTokenizer

    from keel.models.registry import model_dir

    tok = AutoTokenizer.from_pretrained(model_dir("tiny-llama"))
    return tiny_llama(len(tok)), tok
