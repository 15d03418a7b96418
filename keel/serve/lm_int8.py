"""int8 (and int4) weights for a served causal LM: what makes a CPU decode step cheaper.

A decode step at batch 1 reads every weight once, so its time is the weights' bytes over the memory bandwidth
plus the per-op overhead. On one core smollm2-135m's fp32 step reads its 540 MB at about 7 GB/s (74 ms of CPU time),
so fewer bytes is what pays. Three ways to int8 (smollm2-135m, one thread, CPU time per decode step at batch 1 / 16,
held-out Shakespeare perplexity on 4 blocks of 256 tokens; fp32: 74-87 / 170-180 ms, perplexity 44.83):

- ``int8-weight-only``: per-row int8 weights read directly by PyTorch's own CPU kernel
  (``aten._weight_int8pack_mm``, activations in bfloat16): 39-41 / 131-142 ms, perplexity 45.10 (+0.6%, within
  the 2% target of benchmarks/lm_int8.py). The one to serve on a CPU;
- ``int8-dynamic``: PyTorch's fbgemm kernels (``torch.ao.nn.quantized.dynamic.Linear``, per-channel int8 weights,
  activations quantized per call, per tensor, to 7 bits): the fastest, 32-35 / 49-54 ms, but perplexity 125.3 on 8
  blocks (fp32 45.7, +174%): SmolLM2's activation outliers (down_proj's input above all) do not survive one scale per
  tensor. And that scale is one per forward pass, over every row of the batch: a sequence's tokens depend on what
  else is being decoded with it (on a tiny random Llama, greedy output through the scheduler diverged from the
  same model decoding alone).
  Kept for models that tolerate it, measured with benchmarks/cpu_generation.py first;
- ``int4-weight-only``: the decoder's Linears in int4, groups of 32 input columns with a bfloat16 scale and zero
  point each (round to nearest), read by PyTorch's CPU kernel ``aten._weight_int4pack_mm_for_cpu``; the output
  head in int8 as above (it is a fifth of the weights, and in int4 it cost +5% perplexity). Matmuls of every weight
  at batch 1 / 16, one thread: 9-11 / 66 ms (int8 above: 21-28 / 89-102, fp32: 54 / 106); perplexity 44.82 on 4
  blocks (fp32 44.83; all in int4, head included: 47.17; llama.cpp's Q4_K_M 48.08);
- ``torchao-weight-only``: torchao's ``Int8WeightOnlyConfig`` (per-row scales). Its CPU linear converts the int8
  weight back to float32 at every call (``qdata.to(dtype)``): on the 2-core CPU it was 7x slower than fp32 on a
  1536x576 layer (kept for devices where torchao has kernels).

Every Linear of the decoder and the output head is quantized; embeddings and norms stay float32. The int8 and int4
weight-only layers are what keel's own decode step (keel/serve/decode_step.py) fuses (QKV, gate-up).
"""

from __future__ import annotations

import torch

from keel.errors import KeelError


def quantize_lm(model, backend: str, device: str = "cpu"):
    """``model`` with int8 Linear layers (see the module docstring); in place, returned."""
    if backend == "torchao-weight-only":
        from keel.runtime.int8 import torchao_int8

        _untie(model)
        return torchao_int8(model, "weight-only")
    if backend == "int8-weight-only":
        if device != "cpu":
            raise KeelError("serve.backend=int8-weight-only runs on a CPU; on a GPU serve torch (bf16)")
        _untie(model)
        _replace_linears(model, Int8WeightOnlyLinear)
        return model.eval()
    if backend == "int4-weight-only":
        if device != "cpu":
            raise KeelError("serve.backend=int4-weight-only runs on a CPU; on a GPU serve torch (bf16)")
        _untie(model)
        head = model.get_output_embeddings()
        _replace_linears(
            model,
            lambda linear: (
                Int4WeightOnlyLinear(linear)
                if linear is not head and linear.in_features % INT4_GROUP == 0
                else Int8WeightOnlyLinear(linear)
            ),
        )
        return model.eval()
    if backend != "int8-dynamic":
        raise KeelError(
            f"{backend} is not a quantized backend; use int8-weight-only, int4-weight-only, int8-dynamic "
            "or torchao-weight-only"
        )
    if device != "cpu":
        raise KeelError("serve.backend=int8-dynamic runs on a CPU (fbgemm); on a GPU serve torch (bf16)")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise KeelError("serve.backend=int8-dynamic needs PyTorch's fbgemm engine, which this build lacks; use torch")
    import warnings

    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    torch.backends.quantized.engine = "fbgemm"
    _untie(model)

    def dynamic(child):
        child.qconfig = per_channel_dynamic_qconfig
        return DynamicLinear.from_float(child)

    with warnings.catch_warnings():  # torch.ao's eager quantization says it is moving to torchao (no such CPU kernel)
        warnings.simplefilter("ignore")
        _replace_linears(model, dynamic)
    return model.eval()


INT4_GROUP = 32  # input columns per int4 scale and zero point (llama.cpp's Q4_0 / Q4_K blocks are 32 too)


def _replace_linears(model, make) -> None:
    """Every plain ``nn.Linear`` of ``model`` replaced by ``make(linear)``, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, make(child))


class Int8WeightOnlyLinear(torch.nn.Module):
    """A Linear with per-row int8 weights (N, K) and bfloat16 scales (N,), run by ``aten._weight_int8pack_mm``.

    The kernel takes bfloat16 activations (its float32 path is 2x slower than fp32 on a 576x49152 head); the
    output goes back to the input's dtype, so the rest of the model stays float32.
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()  # (N, K)
        # (N,): the row's largest weight maps to 127; rounded to bfloat16 first, so the kernel's scale is the one used
        scale = (w.abs().amax(1) / 127).clamp(min=1e-12).to(torch.bfloat16)
        self.register_buffer("qweight", torch.round(w / scale.float()[:, None]).clamp(-128, 127).to(torch.int8))
        self.register_buffer("scales", scale)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (rows, K)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scales)  # (rows, N)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)  # (..., N)
        return y if self.bias is None else y + self.bias


class Int4WeightOnlyLinear(torch.nn.Module):
    """A Linear with int4 weights in groups of ``group`` input columns, each with a bfloat16 scale and zero point,
    run by ``aten._weight_int4pack_mm_for_cpu`` (bfloat16 activations): half the bytes of int8.

    Rounded to the nearest of 16 levels between each group's minimum and maximum (the kernel's convention:
    w = (q - 8) * scale + zero, so zero is the group's middle); scale and zero are rounded to bfloat16 first.
    """

    def __init__(self, linear: torch.nn.Linear, group: int = INT4_GROUP):
        super().__init__()
        w = linear.weight.detach().float()  # (N, K)
        N, K = w.shape
        wg = w.reshape(N, K // group, group)  # (N, K/g, g)
        low, high = wg.amin(-1), wg.amax(-1)  # (N, K/g)
        scale = ((high - low) / 15).clamp(min=1e-12).to(torch.bfloat16)
        zero = (low + 8 * scale.float()).to(torch.bfloat16)
        q = torch.round((wg - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)  # (N, K/g, g)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).reshape(N, K), 1)
        self.register_buffer("qweight", packed)  # (N, K/2) uint8
        self.register_buffer("scales_zeros", torch.stack([scale, zero], -1).transpose(0, 1).contiguous())  # (K/g, N, 2)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features, self.group = K, N, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (rows, K)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.qweight, self.group, self.scales_zeros)  # (rows, N)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)  # (..., N)
        return y if self.bias is None else y + self.bias


def _untie(model) -> None:
    """Give the output head its own weight, so that quantizing it leaves the (float) embedding as it is."""
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
