"""Pruning: unstructured global magnitude pruning (``torch.nn.utils.prune``, made permanent), and structured
pruning that removes whole attention heads and FFN neurons so the weight matrices really shrink.

Unstructured zeros stay zeros while fine-tuning: a gradient hook multiplies each pruned weight's gradient
by its mask, so AdamW (whose moments then stay 0) never moves them, and decoupled weight decay keeps 0 at 0.

Structured pruning keeps, in every layer, the heads and FFN neurons with the largest weight norms
(|W_q[h]|, |W_k[h]|, |W_v[h]|, |W_o[:, h]| per head; |W_in[j, :]| * |W_out[:, j]| per neuron). The saved model
has smaller matrices than its config says; ``resize_like`` rebuilds that shape before loading the weights.
"""

from __future__ import annotations

import torch
from torch.nn.utils import prune as torch_prune

from keel.compress.distill import layer_list
from keel.errors import KeelError
from keel.models.resize import TrimmedEmbedding, replace_module


def prunable_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    """The Linear layers inside the transformer blocks (embeddings and the task head are left dense)."""
    layers = layer_list(model)
    return [
        (f"{i}.{name}", m)
        for i, block in enumerate(layers)
        for name, m in block.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]


def global_magnitude_prune(model, sparsity: float) -> dict:
    """Zero the ``sparsity`` share of the smallest-magnitude weights across all block Linear layers, permanently."""
    if not 0.0 < sparsity < 1.0:
        raise KeelError(f"compress.prune.sparsity must be in (0, 1); got {sparsity}")
    targets = [(m, "weight") for _, m in prunable_linears(model)]
    torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=sparsity)
    for module, name in targets:
        torch_prune.remove(module, name)  # weight = weight_orig * mask, reparametrisation gone
    return {"sparsity": measured_sparsity(model)}


def measured_sparsity(model) -> float:
    ws = [m.weight for _, m in prunable_linears(model)]
    return float(sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws))


def keep_zeros(model) -> list:
    """Freeze the zeros of every block Linear weight during fine-tuning; returns the hook handles."""
    handles = []
    for _, m in prunable_linears(model):
        mask = (m.weight != 0).to(m.weight.dtype)
        if bool((mask == 0).any()):
            handles.append(m.weight.register_hook(lambda g, mask=mask: g * mask))
    return handles


# -- structured ------------------------------------------------------------------------------------------


def _bert_parts(block):
    att = getattr(block, "attention", None)
    if att is not None and hasattr(att, "self") and hasattr(block, "intermediate"):
        s = att.self
        return {
            "q": s.query,
            "k": s.key,
            "v": s.value,
            "o": att.output.dense,
            "ffn_in": [block.intermediate.dense],
            "ffn_out": block.output.dense,
            "head_dim": s.attention_head_size,
        }
    return None


def _llama_parts(block):
    mlp = getattr(block, "mlp", None)
    if mlp is not None and hasattr(mlp, "gate_proj"):
        return {"ffn_in": [mlp.gate_proj, mlp.up_proj], "ffn_out": mlp.down_proj}
    return None


def _parts(block) -> dict:
    parts = _bert_parts(block) or _llama_parts(block)
    if parts is None:
        raise KeelError(
            f"structured pruning supports BERT-style encoders and Llama-style decoders, not "
            f"{type(block).__name__}; use compress.prune.sparsity (unstructured) for this model"
        )
    return parts


def _keep_rows(linear: torch.nn.Linear, idx: torch.Tensor) -> torch.nn.Linear:
    new = torch.nn.Linear(linear.in_features, len(idx), bias=linear.bias is not None)
    new.weight.data = linear.weight.data[idx].clone()
    if linear.bias is not None:
        new.bias.data = linear.bias.data[idx].clone()
    return new


def _keep_cols(linear: torch.nn.Linear, idx: torch.Tensor) -> torch.nn.Linear:
    new = torch.nn.Linear(len(idx), linear.out_features, bias=linear.bias is not None)
    new.weight.data = linear.weight.data[:, idx].clone()
    if linear.bias is not None:
        new.bias.data = linear.bias.data.clone()
    return new


def structured_prune(model, heads: float = 0.0, ffn: float = 0.0) -> dict:
    """Remove the ``heads`` share of attention heads and the ``ffn`` share of FFN neurons in every layer."""
    for name, value in (("heads", heads), ("ffn", ffn)):
        if not 0.0 <= value < 1.0:
            raise KeelError(f"compress.prune.{name} must be in [0, 1); got {value}")
    kept_heads, kept_ffn = [], []
    for block in layer_list(model):
        p = _parts(block)
        if heads > 0:
            if "q" not in p:
                raise KeelError(
                    "attention-head pruning supports BERT-style encoders; for this decoder prune FFN "
                    "neurons only (compress.prune.heads: 0)"
                )
            d = p["head_dim"]
            n = p["q"].out_features // d
            score = sum(p[k].weight.detach().view(n, d, -1).norm(dim=(1, 2)) for k in "qkv")
            score = score + p["o"].weight.detach().view(p["o"].out_features, n, d).norm(dim=(0, 2))
            keep = score.argsort(descending=True)[: max(1, round(n * (1 - heads)))].sort().values
            rows = (keep[:, None] * d + torch.arange(d)).reshape(-1)
            for k in "qkv":
                replace_module(block, p[k], _keep_rows(p[k], rows))
            replace_module(block, p["o"], _keep_cols(p["o"], rows))
            kept_heads.append(len(keep))
        if ffn > 0:
            w_in = p["ffn_in"][0].weight.detach()
            n = w_in.shape[0]
            score = w_in.norm(dim=1) * p["ffn_out"].weight.detach().norm(dim=0)
            keep = score.argsort(descending=True)[: max(1, round(n * (1 - ffn)))].sort().values
            for lin in p["ffn_in"]:
                replace_module(block, lin, _keep_rows(lin, keep))
            replace_module(block, p["ffn_out"], _keep_cols(p["ffn_out"], keep))
            kept_ffn.append(len(keep))
    return {"heads_per_layer": kept_heads or None, "ffn_per_layer": kept_ffn or None}


def trim_vocabulary(model, token_ids: set[int], unk_id: int) -> dict:
    """Keep only the embedding rows of ``token_ids`` (plus the unknown token). Encoders only: a causal LM's
    output layer shares these rows and must keep predicting every token."""
    if getattr(model.config, "is_decoder", False) or hasattr(model, "lm_head"):
        raise KeelError(
            "vocabulary trimming is for encoders (classifiers); a causal LM must keep its whole "
            "vocabulary: set compress.prune.vocab=false"
        )
    emb = model.get_input_embeddings()
    if not isinstance(emb, torch.nn.Embedding):
        raise KeelError("the model's embeddings are already trimmed or not a plain embedding table")
    vocab = emb.weight.shape[0]
    keep = torch.tensor(sorted({i for i in token_ids if 0 <= i < vocab} | {unk_id}))
    id_map = torch.full((vocab,), int((keep == unk_id).nonzero()[0, 0]), dtype=torch.long)
    id_map[keep] = torch.arange(len(keep))
    model.set_input_embeddings(TrimmedEmbedding(id_map, emb.weight.data[keep].clone()))
    return {"tokens_kept": len(keep), "tokens_before": vocab}
