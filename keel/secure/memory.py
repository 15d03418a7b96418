"""Models, tokenizers and ONNX sessions built from file bytes (a sealed folder opened in memory): no plaintext file."""

from __future__ import annotations

import json

from keel.secure.seal import SealError


def _need(files: dict, name: str, what: str) -> bytes:
    if name not in files:
        raise SealError(f"the sealed {what} has no {name}; re-seal a complete model folder")
    return files[name]


def tokenizer(files: dict[str, bytes]):
    """The fast tokenizer of tokenizer.json + tokenizer_config.json, as AutoTokenizer would build it from disk."""
    import transformers
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(_need(files, "tokenizer.json", "model").decode())
    config = json.loads(files.get("tokenizer_config.json", b"{}"))
    cls = getattr(transformers, str(config.get("tokenizer_class") or ""), None) or transformers.PreTrainedTokenizerFast
    return cls(tokenizer_object=backend, **config)


def hf_model(files: dict[str, bytes], **config_overrides):
    """The architecture named in config.json with the weights of model.safetensors (``safetensors.torch.load``)."""
    import transformers
    from safetensors.torch import load
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config_dict = {**json.loads(_need(files, "config.json", "model")), **config_overrides}
    arch = (config_dict.get("architectures") or [None])[0]
    cls = getattr(transformers, str(arch), None)
    if cls is None:
        raise SealError(
            f"config.json names no architecture this transformers knows ({arch!r}); a sealed model needs one"
        )
    config = transformers.AutoConfig.for_model(**config_dict)
    state = load(_need(files, "model.safetensors", "model"))
    return cls.from_pretrained(None, config=config, state_dict=state, use_safetensors=True)


def onnx_session(files: dict[str, bytes], name: str = "model.onnx", options=None):
    """An ONNX Runtime session from bytes; external data (model.onnx.data) is put back inside the graph first.
    ``options``: the caller's ``onnxruntime.SessionOptions`` (default: ORT's, quiet)."""
    import onnxruntime as ort

    data = _need(files, name, "ONNX export")
    inits = _external(files, data)
    if inits is not None:
        data = inits
    opts = options
    if opts is None:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])


def _external(files: dict[str, bytes], data: bytes) -> bytes | None:
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load_model_from_string(data)
    tensors = [t for t in _initializers(model.graph) if uses_external_data(t)]
    if not tensors:
        return None
    for t in tensors:
        info = {e.key: e.value for e in t.external_data}
        blob = _need(files, info["location"], "ONNX export")
        start = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else len(blob) - start
        t.raw_data = blob[start : start + length]
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
    return model.SerializeToString()


def _initializers(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.g is not None and attr.g.ByteSize():
                yield from _initializers(attr.g)
