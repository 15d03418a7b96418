"""int8 weights for a served causal LM: what makes a CPU decode step cheaper.

A decode step at batch 1 reads every weight once, so its time is the weights' bytes over the memory bandwidth
plus the per-op overhead. Two ways to int8, measured on the 2-core CPU of benchmarks/cpu_generation.py:

- ``torchao-weight-only``: torchao's ``Int8WeightOnlyConfig`` (per-row scales). Its CPU linear converts the int8
  weight back to float32 at every call (``qdata.to(dtype)``), so it reads more memory than fp32 and is slower on a
  CPU (kept for the comparison, and for devices where torchao has kernels);
- ``int8-dynamic``: PyTorch's fbgemm kernels (``torch.ao.nn.quantized.dynamic.Linear``, per-channel int8 weights,
  activations quantized per step): an int8 GEMM that reads the int8 weights directly. This is the fast one on a CPU.

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
