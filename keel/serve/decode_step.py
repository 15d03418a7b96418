"""keel's own decode step for Llama-family causal LMs: the weights called directly, without transformers' modules.

Why: a decode step at batch 1 is 30 layers x ~40 small ops in transformers' modules (Python, dispatch, views,
dtype conversions) around 7 matmuls a layer. With fp32 weights the matmuls are 86% of the step's CPU time
(smollm2-135m, one thread: 50 of 57 ms), but with int8 weights (``aten._weight_int8pack_mm``, 21 ms for every
weight) the rest was half of the step. Here a layer is: RMSNorm, one fused QKV matmul, RoPE, a write into the
scheduler's KV cache, SDPA (grouped queries packed per KV head, so keys are never repeated), the output matmul,
RMSNorm, one fused gate-up matmul, SiLU x up, the down matmul. The fused weights are the only copy: the model's
own q/k/v and gate/up weights become views of them, so the prefill (still transformers' forward) reads the same
memory.

Supported: ``LlamaForCausalLM`` (and others with its layout: Llama-style RMSNorm, RoPE from the model's own
``rotary_emb``, no biases, SiLU MLP, full attention), with float or ``Int8WeightOnlyLinear`` projections. Anything
else is refused by ``supports`` and served by transformers' forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from keel.errors import KeelError
from keel.serve.lm_int8 import Int8WeightOnlyLinear

# Rows: B sequences; L: cache length; E: hidden size; H / Hkv: query / KV heads; G = H // Hkv; D: head size.


def supports(model) -> str | None:
    """None when ``model`` can use ``LlamaDecodeStep``, else why not (one phrase)."""
    config = model.config
    if type(model).__name__ != "LlamaForCausalLM":
        return f"{type(model).__name__} is not a LlamaForCausalLM"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "its projections have biases"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"its activation is {config.hidden_act}, not silu"
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if not all(type(p) in (torch.nn.Linear, Int8WeightOnlyLinear) for p in projections):
            return "its projections are neither float nor int8-weight-only Linear layers"
        if len({type(p) for p in projections}) != 1:
            return "its projections mix layer types"
    return None


DECODE_CHOICES = ("auto", "keel", "transformers")


def decode_step_for(model, decode: str = "auto"):
    """serve.decode: ``auto`` -> keel's step when ``model`` supports it, else None (transformers' forward);
    ``keel`` -> keel's step, or a KeelError saying why the model cannot have it; ``transformers`` -> None."""
    if decode not in DECODE_CHOICES:
        raise KeelError(f"serve.decode must be one of {', '.join(DECODE_CHOICES)}; got {decode!r}")
    if decode == "transformers":
        return None
    why = supports(model)
    if why is None:
        return LlamaDecodeStep(model)
    if decode == "keel":
        raise KeelError(
            f"serve.decode=keel: keel's decode step cannot run this model ({why}); "
            "use serve.decode=auto or serve.decode=transformers"
        )
    return None


class _Fused:
    """Several Linear layers (same input) as one matmul whose output columns are theirs, side by side.

    The layers' own weights become row slices of the fused one (views), so memory is not doubled.
    """

    def __init__(self, linears: list):
        self.int8 = isinstance(linears[0], Int8WeightOnlyLinear)
        if self.int8:
            self.qweight = torch.cat([p.qweight for p in linears])  # (N, K) int8
            self.scales = torch.cat([p.scales for p in linears])  # (N,) bfloat16
            start = 0
            for p in linears:
                n = p.out_features
                p.qweight, p.scales = self.qweight[start : start + n], self.scales[start : start + n]
                start += n
        else:
            self.weight = torch.cat([p.weight.detach() for p in linears])  # (N, K)
            start = 0
            for p in linears:
                n = p.out_features
                p.weight = torch.nn.Parameter(self.weight[start : start + n], requires_grad=False)
                start += n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (B, K) -> (B, N)
        if self.int8:
            return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self.scales).to(x.dtype)
        return F.linear(x, self.weight)


class LlamaDecodeStep:
    """``step(ids, positions, mask, cache) -> logits``: one new token per row through every layer.

    ``cache`` is the scheduler's (its layers' ``update(keys, values)`` append one column and return every column);
    ``mask`` (B, L+1) marks the columns each row may attend to, the new one included.
    """

    def __init__(self, model):
        why = supports(model)
        if why is not None:
            raise ValueError(f"keel's decode step cannot run this model: {why}")
        config = model.config
        self.model = model
        self.D = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.H, self.Hkv = config.num_attention_heads, config.num_key_value_heads
        self.eps = config.rms_norm_eps
        self.scale = self.D**-0.5
        self.layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                (
                    layer.input_layernorm.weight,
                    _Fused([attn.q_proj, attn.k_proj, attn.v_proj]),
                    attn.o_proj,
                    layer.post_attention_layernorm.weight,
                    _Fused([mlp.gate_proj, mlp.up_proj]),
                    mlp.down_proj,
                )
            )
        self.embed, self.norm, self.head = model.model.embed_tokens, model.model.norm.weight, model.lm_head
        self.rotary = model.model.rotary_emb
        self.inter = config.intermediate_size

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # (B, E)
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        B, H, Hkv, D = ids.shape[0], self.H, self.Hkv, self.D
        x = self.embed(ids)  # (B, E)
        cos, sin = self.rotary(x, positions[:, None])  # (B, 1, D) each
        cos, sin = cos[:, :, None], sin[:, :, None]  # (B, 1, 1, D): one per row, broadcast over heads
        allowed = mask.bool()[:, None, None, :]  # (B, 1, 1, L+1)
        half = D // 2
        for (norm1, qkv, o_proj, norm2, gate_up, down), layer in zip(self.layers, cache.layers):
            h = qkv(self._rms(x, norm1))  # (B, (H + 2 Hkv) D)
            q, k, v = h.view(B, H + 2 * Hkv, 1, D).split([H, Hkv, Hkv], dim=1)  # (B, *, 1, D)
            # RoPE on q and k at once: rotate_half(t) = cat(-t2, t1)
            qk = torch.cat([q, k], 1)  # (B, H + Hkv, 1, D)
            rot = torch.cat([-qk[..., half:], qk[..., :half]], -1)
            qk = qk * cos + rot * sin
            q, k = qk[:, :H], qk[:, H:]
            keys, values = layer.update(k, v.contiguous())  # (B, Hkv, L+1, D)
            q = q.reshape(B, Hkv, H // Hkv, D)  # the query heads of each KV head as its query rows
            a = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=self.scale)  # (B, Hkv, G, D)
            x = x + o_proj(a.reshape(B, H * D))
            g, u = gate_up(self._rms(x, norm2)).split(self.inter, -1)  # (B, I) each
            x = x + down(F.silu(g) * u)
        return self.head(self._rms(x, self.norm))  # (B, V)
