"""Pretraining from scratch (``model.init: scratch``): a tokenizer trained on the corpus and a random model.

The engine then trains it like any other causal LM (mixed precision, fused AdamW on GPU, data parallel,
exact resume). What this package adds is the starting point, built once and cached by content:

    training split texts --tokenizers BPE (byte level)--> tokenizer
    size preset (plain numbers below) + vocabulary    --> random Llama/GPT-2 weights (seeded)

Also here: sample generations from a finished run, for the report (``eval/samples.json``).
This module imports no torch at load time, so ``keel validate`` stays fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from keel.errors import RecipeError
from keel.io import atomic_dir, atomic_write_json, cache_dir

logger = logging.getLogger(__name__)

SCRATCH_VERSION = 2  # 2: vocabulary rows padded to a multiple of 64
BOS = EOS = "<|endoftext|>"
PAD = "<|pad|>"

# Size presets: plain numbers, one line each. "gpt2-small" is the GPT-2-small shape of the GPU benchmark.
PRESETS: dict[str, dict] = {
    "llama-micro": dict(arch="llama", hidden=64, layers=2, heads=4, kv_heads=2, ffn=192),  # tests
    "llama-mini": dict(arch="llama", hidden=128, layers=4, heads=4, kv_heads=4, ffn=384),  # CPU recipe
    "llama-small": dict(arch="llama", hidden=384, layers=6, heads=6, kv_heads=6, ffn=1024),
    "llama-base": dict(arch="llama", hidden=768, layers=12, heads=12, kv_heads=12, ffn=2048),
    "gpt2-small": dict(arch="gpt2", hidden=768, layers=12, heads=12, kv_heads=12, ffn=3072),
}


def check_preset(name: str) -> dict:
    if name not in PRESETS:
        raise RecipeError(
            f"model.name: '{name}' is not a size preset for model.init: scratch; use one of {', '.join(PRESETS)}"
        )
    return PRESETS[name]


def model_config(preset: str, vocab_size: int, max_length: int, bos_id: int, eos_id: int, pad_id: int):
    """A transformers config for a size preset (random weights come from ``from_config``)."""
    p = check_preset(preset)
    if p["arch"] == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=max_length,
            n_embd=p["hidden"],
            n_layer=p["layers"],
            n_head=p["heads"],
            n_inner=p["ffn"],
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            tie_word_embeddings=True,
        )
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=p["hidden"],
        intermediate_size=p["ffn"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["kv_heads"],
        max_position_embeddings=max_length,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def train_tokenizer(texts, vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE tokenizer (GPT-2 style, any text encodes) trained with `tokenizers`, as a HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=PAD)


def scratch_model_dir(recipe) -> Path:
    """The starting folder of a from-scratch run: built once per (data, tokenizer settings, preset, seed)."""
    from keel.data.prepare import _source_digest

    check_preset(recipe.model.name)
    _, _, content = _source_digest(recipe)
    key_obj = {
        "v": SCRATCH_VERSION,
        "content": content,
        "data": recipe.data.model_dump(mode="json"),
        "pretrain": recipe.pretrain.model_dump(mode="json", include={"vocab_size", "min_frequency"}),
        "preset": recipe.model.name,
        "max_length": recipe.model.max_length,
        "seed": recipe.train.seed,
    }
    key = hashlib.sha256(json.dumps(key_obj, sort_keys=True).encode()).hexdigest()
    final = cache_dir() / "models" / f"scratch-{recipe.model.name}-{key[:16]}"
    if (final / "manifest.json").is_file():
        logger.info(f"model: reusing the tokenizer and initial weights in {final}")
        return final

    import torch
    from transformers import AutoModelForCausalLM

    from keel.data.load import load_splits

    raw = load_splits(recipe.data, "causal-lm")
    cfg = recipe.pretrain
    tokenizer = train_tokenizer(raw.train["text"].tolist(), cfg.vocab_size, cfg.min_frequency)
    # Embedding rows padded to a multiple of 64 (as nanoGPT's 50257 -> 50304): the output projection is the largest
    # matmul of a small LM and runs on faster GPU kernels when its width divides evenly; the spare rows are never a
    # target, so training drives their logits down and decoding skips unknown ids.
    config = model_config(
        recipe.model.name,
        -(-len(tokenizer) // 64) * 64,
        recipe.model.max_length,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(recipe.train.seed)
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    logger.info(
        f"model: {recipe.model.name} from scratch, {n / 1e6:.2f}M parameters, byte-level BPE vocabulary "
        f"{len(tokenizer)} trained on {len(raw.train)} training documents; cached in {final}"
    )
    return final


def write_samples(run_dir: Path, recipe) -> list[dict]:
    """A few continuations of the test split's openings (seeded sampling) -> eval/samples.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from keel.data.prepare import prepare_data

    n, new = recipe.pretrain.samples, recipe.pretrain.sample_tokens
    if n == 0:
        return []
    folder = Path(run_dir) / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
    data = prepare_data(recipe, tokenizer, run_dir)  # the splits frozen at training time
    source = data.splits["test"] if len(data.splits["test"]) else data.splits["validation"]
    stride = max(1, len(source) // max(n, 1))
    samples = []
    for i in range(0, min(len(source), n * stride), stride):
        prompt = torch.tensor([source[i]["input_ids"][:16]])  # (1, T0)
        with torch.random.fork_rng():
            torch.manual_seed(i)
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new,
                do_sample=True,
                temperature=0.8,
                top_k=40,
                pad_token_id=tokenizer.pad_token_id,
            )
        samples.append(
            {"prompt": tokenizer.decode(prompt[0]), "completion": tokenizer.decode(out[0, prompt.shape[1] :])}
        )
    atomic_write_json(Path(run_dir) / "eval" / "samples.json", {"temperature": 0.8, "top_k": 40, "samples": samples})
    return samples
