"""int8 weights for a served causal LM: what makes a CPU decode step cheaper.

A decode step at batch 1 reads every weight once, so its time is the weights' bytes over the memory bandwidth
plus the per-op overhead. Two ways to int8:

- ``torchao-weight-only``: torchao's ``Int8WeightOnlyConfig`` (per-row scales). Its CPU linear converts the int8
  weight back to float32 at every call (``qdata.to(dtype)``): on the 2-core CPU it was 7x slower than fp32 on a
  1536x576 layer (kept for devices where torchao has kernels);
- ``int8-dynamic``: PyTorch's fbgemm kernels (``torch.ao.nn.quantized.dynamic.Linear``, per-channel int8 weights,
  activations quantized per call): an int8 GEMM that reads the int8 weights directly, 4.7x faster than fp32 on
  smollm2's 49152x576 output head alone. End to end it is not faster at batch 1 (smollm2-135m, 2 loaded cores, 32
  greedy steps, 2 alternating rounds: 0.74x and 0.89x fp32's tokens/s): the step is bound by per-op overhead, and
  quantizing the activations of 211 small matmuls adds to it. What is left to win is that overhead (a compiled or
  fused decode step), not bandwidth.

Every Linear of the decoder and the output head is quantized; embeddings and norms stay float32.
"""

from __future__ import annotations

from keel.errors import KeelError


def quantize_lm(model, backend: str, device: str = "cpu"):
    """``model`` with int8 Linear layers (see the module docstring); in place, returned."""
    import torch

    if backend == "torchao-weight-only":
        from keel.runtime.int8 import torchao_int8

        _untie(model)
        return torchao_int8(model, "weight-only")
    if device != "cpu":
        raise KeelError("serve.backend=int8-dynamic runs on a CPU (fbgemm); on a GPU serve torch (bf16)")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise KeelError("serve.backend=int8-dynamic needs PyTorch's fbgemm engine, which this build lacks; use torch")
    import warnings

    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    torch.backends.quantized.engine = "fbgemm"
    _untie(model)
    with (
        warnings.catch_warnings()
    ):  # torch.ao's eager quantization says it is moving to torchao (which has no such CPU kernel)
        warnings.simplefilter("ignore")
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    child.qconfig = per_channel_dynamic_qconfig
                    setattr(parent, name, DynamicLinear.from_float(child))
    return model.eval()


def _untie(model) -> None:
    """Give the output head its own weight, so that quantizing it leaves the (float) embedding as it is."""
    import torch

    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
