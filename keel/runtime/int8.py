"""int8 for the PyTorch backend, through torchao (ONNX Runtime's int8 lives in keel/export/onnx.py).

``weight-only``: int8 weights, dequantized inside the matmul (works for classifiers and causal LMs, and is
the one with fast CPU kernels). ``dynamic``: int8 weights and activations quantized per batch; torchao has
no fast CPU kernels for it (measured ~15x slower than fp32 on 2 cores), so it is there for GPUs.
Both are applied when the model is loaded: the saved weights stay the fp32 safetensors.
"""

from __future__ import annotations

from keel.errors import KeelError

MODES = ("weight-only", "dynamic")


def torchao_int8(model, mode: str = "weight-only"):
    """Quantize every ``nn.Linear`` of ``model`` in place (the task head included) and return it."""
    import torch
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    if mode not in MODES:
        raise KeelError(f"torchao int8 mode must be one of {', '.join(MODES)}; got {mode!r}")
    if not any(isinstance(m, torch.nn.Linear) for m in model.modules()):
        raise KeelError(f"{type(model).__name__} has no Linear layers to quantize; use the torch backend")
    model = model.float().eval()
    quantize_(model, Int8WeightOnlyConfig() if mode == "weight-only" else Int8DynamicActivationInt8WeightConfig())
    return model
