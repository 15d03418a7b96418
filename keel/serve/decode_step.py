"""keel's own decode step for Llama-family causal LMs: the weights called directly, without transformers' modules.

Why: a decode step at batch 1 is 30 layers x ~40 small ops in transformers' modules (Python, dispatch, views,
dtype conversions) around 7 matmuls a layer. With fp32 weights the matmuls are 86% of the step's CPU time
(smollm2-135m, one thread: 50 of 57 ms), but with int8 weights (``aten._weight_int8pack_mm``, 21 ms for every
weight) the rest was half of the step. Here a layer is: RMSNorm, one fused QKV matmul, RoPE, a write into the
scheduler's KV cache, SDPA (grouped queries packed per KV head, so keys are never repeated), the output matmul,
RMSNorm, one fused gate-up matmul, SiLU x up, the down matmul. The fused weights are the only copy: the model's
own q/k/v and gate/up weights become views of them, so the prefill (still transformers' forward) reads the same
memory. CPU time per step (smollm2-135m, one thread, batch 1, busy machine): int8 31 vs 42 ms, int4 24-32 vs
36-40 ms, fp32 about level (its matmuls are the step); at batch 16 the int8/int4 kernels are the step (see
benchmarks/README.md). Greedy tokens equal transformers' with fp32 weights; with int8/int4 the bfloat16 activations
can round differently, so a close pick may go the other way (held-out perplexity through the step: within 0.2%).

Supported: ``LlamaForCausalLM`` without biases, with a SiLU MLP and its own ``rotary_emb`` (any RoPE type), with
float, ``Int8WeightOnlyLinear`` or ``Int4WeightOnlyLinear`` projections. Anything else (torchao's quantized tensors,
fbgemm's dynamic layers, other architectures) is refused by ``supports`` and served by transformers' forward.
Not done: a static-shape cache with a compiled step (inductor on the pieces around the cache write was slower).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from keel.errors import KeelError
from keel.serve.lm_int8 import Int4WeightOnlyLinear, Int8WeightOnlyLinear

PROJECTIONS = (torch.nn.Linear, Int8WeightOnlyLinear, Int4WeightOnlyLinear)

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
        if not all(type(p) in PROJECTIONS for p in projections):
            return "its projections are not float, int8- or int4-weight-only Linear layers"
        if any(type(p) is torch.nn.Linear and type(p.weight.detach()) is not torch.Tensor for p in projections):
            return "its Linear weights are tensor subclasses (torchao's quantized weights, say)"
        if len({type(p) for p in projections}) != 1:
            return "its projections mix layer types"
    return None


DECODE_CHOICES = ("auto", "keel", "transformers")


def decode_step_for(model, decode: str = "auto"):
    """serve.decode: ``auto`` -> keel's step when ``model`` supports it and is on a CPU (where it was measured), else
    None (transformers' forward); ``keel`` -> keel's step, or a KeelError saying why the model cannot have it;
    ``transformers`` -> None."""
    if decode not in DECODE_CHOICES:
        raise KeelError(f"serve.decode must be one of {', '.join(DECODE_CHOICES)}; got {decode!r}")
    if decode == "transformers" or (decode == "auto" and model.device.type != "cpu"):
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

    The layers' own weights become row slices of the fused one (views), so memory is not doubled. int4 weights are
    packed in blocks of output rows (64 on an AVX-512 CPU): they fuse when a probe input gives the layers' own outputs
    exactly (smollm2's 576 + 192 + 192 rows do; a tiny model's 64 + 32 + 32 do not), else the layers run one after the
    other and their outputs are concatenated; their scales and zero points (an eighth of the int4 bytes) are copied.
    """

    def __init__(self, linears: list):
        self.kind, self.parts = type(linears[0]), None
        rows = [p.out_features for p in linears]
        if self.kind is Int4WeightOnlyLinear:
            self.parts = linears  # until the fused packing is seen to give the layers' own outputs
            if len({p.group for p in linears}) > 1:
                return
            self.group = linears[0].group
            self.qweight = torch.cat([p.qweight for p in linears])  # (N, K/2) packed
            self.scales_zeros = torch.cat([p.scales_zeros for p in linears], 1)  # (K/g, N, 2)
            probe = torch.randn(1, linears[0].in_features, generator=torch.Generator().manual_seed(0))
            with torch.inference_mode():
                if not torch.equal(self._int4(probe), torch.cat([p(probe) for p in linears], -1)):
                    return
            self.parts = None
            for p, start in zip(linears, _starts(rows)):  # (their scales stay theirs: a column slice is no view
                p.qweight = self.qweight[start : start + p.out_features]  # the kernel can read)
        elif self.kind is Int8WeightOnlyLinear:
            self.qweight = torch.cat([p.qweight for p in linears])  # (N, K) int8
            self.scales = torch.cat([p.scales for p in linears])  # (N,) bfloat16
            for p, start in zip(linears, _starts(rows)):
                p.qweight, p.scales = (
                    self.qweight[start : start + p.out_features],
                    self.scales[start : start + p.out_features],
                )
        else:
            self.weight = torch.cat([p.weight.detach() for p in linears])  # (N, K)
            for p, start in zip(linears, _starts(rows)):
                p.weight = torch.nn.Parameter(self.weight[start : start + p.out_features], requires_grad=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (B, K) -> (B, N)
        if self.parts is not None:
            return torch.cat([p(x) for p in self.parts], -1)
        if self.kind is Int4WeightOnlyLinear:
            return self._int4(x)
        if self.kind is Int8WeightOnlyLinear:
            return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self.scales).to(x.dtype)
        return F.linear(x, self.weight)

    def _int4(self, x: torch.Tensor) -> torch.Tensor:  # (B, K) -> (B, N)
        xb = x.to(torch.bfloat16).contiguous()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.qweight, self.group, self.scales_zeros).to(x.dtype)


def _starts(rows: list[int]) -> list[int]:
    return [sum(rows[:i]) for i in range(len(rows))]


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

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # (B, E), in float32 as LlamaRMSNorm
        h = x.float()
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

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
