"""Models whose saved matrices are smaller than their config says (structurally pruned, vocabulary-trimmed):
rebuild that shape from the saved weights, then load them. Loading needs only this; pruning is keel/compress/prune.py."""

from __future__ import annotations

import torch

from keel.errors import KeelError


def replace_module(root: torch.nn.Module, old: torch.nn.Module, new: torch.nn.Module) -> None:
    for module in root.modules():
        for name, child in module.named_children():
            if child is old:
                setattr(module, name, new)
                return
    raise RuntimeError("module to replace not found")


class TrimmedEmbedding(torch.nn.Module):
    """Token embeddings for the tokens a model was trained on; every other token id maps to the unknown token.

    The tokenizer is unchanged: ``id_map`` (V_tokenizer,) turns its ids into rows of ``weight`` (V_kept, H),
    inside the model, so exports and servers feed the same ids as before.
    """

    def __init__(self, id_map: torch.Tensor, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("id_map", id_map)
        self.weight = torch.nn.Parameter(weight)
        self.embedding_dim = weight.shape[1]

    @property
    def num_embeddings(self) -> int:
        return int(self.id_map.shape[0])  # ids the model accepts, as for nn.Embedding

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, H)
        return torch.nn.functional.embedding(self.id_map[input_ids], self.weight)


def resize_like(model, shapes: dict[str, tuple]) -> None:
    """Shrink every Linear whose saved weight (``shapes``: name -> shape) is smaller than the config's, and
    put back trimmed embedding tables (saved with their ``id_map``)."""
    for key, shape in shapes.items():
        if key.endswith(".id_map"):
            path = key[: -len(".id_map")]
            old = model.get_submodule(path)
            dim = shapes[f"{path}.weight"]
            replace_module(model, old, TrimmedEmbedding(torch.zeros(shape, dtype=torch.long), torch.zeros(dim)))
    modules = dict(model.named_modules())
    for key, shape in shapes.items():
        if not key.endswith(".weight") or len(shape) != 2:
            continue
        module = modules.get(key[: -len(".weight")])
        if isinstance(module, torch.nn.Linear) and tuple(module.weight.shape) != tuple(shape):
            new = torch.nn.Linear(shape[1], shape[0], bias=module.bias is not None)
            replace_module(model, module, new)


def is_resized(folder) -> bool:
    """Whether a saved model's matrices differ from its config (a structurally pruned model)."""
    import json
    from pathlib import Path

    info = Path(folder) / "keel.json"
    return info.is_file() and bool(json.loads(info.read_text()).get("resized"))


def load_resized(auto_class, folder):
    """Build from the config, shrink the Linear layers to the saved shapes, then load the weights (strict)."""
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoConfig

    files = sorted(Path(folder).glob("*.safetensors"))
    shapes = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            shapes.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    model = auto_class.from_config(AutoConfig.from_pretrained(folder))
    resize_like(model, shapes)
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not any(k.endswith(t) for t in tied)]
    if missing or unexpected:
        raise KeelError(
            f"{folder}: weights do not fit the pruned model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); prune again with `keel prune`"
        )
    if tied:
        model.tie_weights()
    return model.eval()
