"""Run llama.cpp's ``convert_hf_to_gguf.py`` on a Hugging Face folder, in a process of its own.

    python -m keel.export.gguf_convert CONVERTER_DIR MODEL_DIR OUT.gguf OUTTYPE

Its own process: the converter calls ``logging.basicConfig`` and ``sys.exit``, and imports top-level packages
named ``conversion`` and ``gguf`` (its own ``gguf-py``, which the converter needs: the released package lacks parts).

One addition: llama.cpp names a BPE tokenizer's pre-tokenizer by the hash of a test string's tokens, and a
tokenizer keel trained from scratch (``keel/pretrain``: byte-level BPE, GPT-2's split) has a hash of its own.
When the hash is unknown and the tokenizer's pre-tokenizer is exactly GPT-2's (ByteLevel with its regex, no
prefix space), the converter is told ``gpt-2``; anything else is refused as before. The export's parity check
(same tokens, same greedy continuations) is what shows the choice right.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("keel.export.gguf_convert")


def gpt2_pre_tokenizer(model_dir: Path) -> bool:
    """The folder's tokenizer.json splits text as GPT-2's byte-level BPE does."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    pre = json.loads(path.read_text()).get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)


def run(converter: Path, model_dir: Path, out: Path, outtype: str) -> None:
    os.environ["NO_LOCAL_GGUF"] = "1"  # the path is set here, before `conversion` imports gguf
    sys.path[:0] = [str(converter), str(converter / "gguf-py")]
    from conversion import base

    known = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            if not gpt2_pre_tokenizer(model_dir):
                raise
            logger.warning("pre-tokenizer hash unknown to llama.cpp; the tokenizer is GPT-2's byte-level BPE: gpt-2")
            return "gpt-2"

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    import convert_hf_to_gguf

    sys.argv = ["convert_hf_to_gguf.py", str(model_dir), "--outfile", str(out), "--outtype", outtype]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    converter_dir, model, outfile, kind = sys.argv[1:5]
    run(Path(converter_dir), Path(model), Path(outfile), kind)
