"""A BERT-style classifier whose per-token work skips the padding: the graph keel exports for ONNX Runtime.

A padded batch (B, T) of texts of mixed length is mostly padding when it comes in a caller's order (the demo's
batches of 32 tweets in file order: 1.8 padded tokens per real one). Every Linear, LayerNorm and GELU of a
transformer works on one token at a time, so here they run on the N real tokens only, packed into (N, H);
only attention, which needs each text's tokens side by side, scatters them back into (B, T) for its matmuls.
The logits are those of the padded model (checked at export against eager PyTorch, as every export is).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def can_pack(model) -> bool:
    """Whether ``model`` is an encoder classifier this module knows: BERT's layout (bert, MiniLM, ...)."""
    config = getattr(model, "config", None)
    bert = getattr(model, "bert", None)
    return (
        getattr(config, "model_type", None) == "bert"
        and bert is not None
        and hasattr(model, "classifier")
        and getattr(config, "position_embedding_type", "absolute") == "absolute"
        and not getattr(config, "is_decoder", False)
        and getattr(bert, "pooler", None) is not None
    )


class PackedBertClassifier(torch.nn.Module):
    """``model``'s forward pass (eval mode), the per-token parts run on the real tokens only."""

    def __init__(self, model):
        super().__init__()
        self.model = model.eval()

    def forward(self, input_ids, attention_mask, token_type_ids=None):  # (B, T) each -> logits (B, C)
        bert = self.model.bert
        emb = bert.embeddings
        B, T = input_ids.shape
        keep = attention_mask.reshape(-1).nonzero().squeeze(-1)  # (N,) flat indices of the real tokens
        positions = torch.arange(T, device=input_ids.device).repeat(B)[keep]  # (N,)
        types = token_type_ids.reshape(-1)[keep] if token_type_ids is not None else torch.zeros_like(positions)
        h = (
            emb.word_embeddings(input_ids.reshape(-1)[keep])
            + emb.position_embeddings(positions)
            + emb.token_type_embeddings(types)
        )  # (N, H)
        h = emb.LayerNorm(h)
        key_ok = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        for layer in bert.encoder.layer:
            att = layer.attention
            h = att.output.LayerNorm(att.output.dense(self._attend(att.self, h, keep, key_ok, B, T)) + h)  # (N, H)
            h = layer.output.LayerNorm(layer.output.dense(layer.intermediate(h)) + h)  # (N, H)
        lengths = attention_mask.sum(-1)  # (B,)
        first = lengths.cumsum(0) - lengths  # (B,) each text's first token ([CLS]) in the packed rows
        return self.model.classifier(bert.pooler.activation(bert.pooler.dense(h[first])))  # (B, C)

    @staticmethod
    def _attend(sa, h, keep, key_ok, B: int, T: int):
        """Self-attention over the packed tokens ``h`` (N, H): scattered to (B, T) for the matmuls, then packed again."""
        d = sa.attention_head_size

        def heads(x):  # (N, A) -> (B, heads, T, d); padded rows are zeros (masked as keys, dropped as queries)
            full = x.new_zeros(B * T, x.shape[-1]).index_copy(0, keep, x)  # (B*T, A)
            return full.view(B, T, -1, d).transpose(1, 2)

        q, k, v = heads(sa.query(h)), heads(sa.key(h)), heads(sa.value(h))  # (B, nh, T, d)
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(d))  # (B, nh, T, T)
        probs = F.softmax(scores.masked_fill(~key_ok, torch.finfo(scores.dtype).min), dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(B * T, -1)  # (B*T, A)
        return out[keep]  # (N, A)
