"""Recipe sections for compression: compress.* (distill, prune, quantize, budget)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from keel.recipe.base import Strict


class DistillConfig(Strict):
    """Teacher (the run's model) -> a smaller student trained on labels and the teacher's soft outputs."""

    student: str | None = Field(
        None, description="registry model or folder for the student; default: cut from the teacher"
    )
    layers: int | list[int] | None = Field(
        None,
        description="teacher layers the student keeps: a count (spread evenly) or indices; default: every other layer",
    )
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the label loss; 1 - alpha goes to the teacher's")
    temperature: float = Field(2.0, gt=0.0, description="softmax temperature of the distillation loss")
    hidden_weight: float = Field(0.0, ge=0.0, description="weight of hidden-state matching (same width only)")
    epochs: int = Field(2, ge=0, description="0: only cut the student; the pruning stage's fine-tuning then distils it")
    transfer_samples: int | None = Field(
        None,
        ge=1,
        description="distil on this many training-split texts (a superset of the teacher's) labelled by the "
        "teacher alone: alpha becomes 0, no label is read; also used by the pruning stage's fine-tuning",
    )
    lr: float = Field(1e-4, gt=0.0, lt=1.0, description="learning rate of the student")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimiser steps")

    @model_validator(mode="after")
    def _one_student(self) -> DistillConfig:
        if self.student is not None and self.layers is not None:
            raise ValueError(
                "set either compress.distill.student (a model) or compress.distill.layers (cut from the "
                "teacher), not both"
            )
        if isinstance(self.layers, int) and self.layers < 1:
            raise ValueError(f"compress.distill.layers = {self.layers} keeps no layer; give a count of 1 or more")
        if isinstance(self.layers, list) and (
            not self.layers or min(self.layers) < 0 or len(set(self.layers)) < len(self.layers)
        ):
            raise ValueError(f"compress.distill.layers {self.layers} must be distinct teacher layer indices from 0")
        return self


class PruneConfig(Strict):
    """Pruning of the latest model (the student when there is one), then optional fine-tuning."""

    heads: float = Field(0.0, ge=0.0, lt=1.0, description="share of attention heads removed in every layer")
    ffn: float = Field(0.0, ge=0.0, lt=1.0, description="share of FFN neurons removed in every layer")
    sparsity: float | None = Field(None, gt=0.0, lt=1.0, description="unstructured: share of block weights zeroed")
    vocab: bool = Field(
        False,
        description="keep only the embedding rows of tokens seen in the training split "
        "(classifiers; other tokens read as the unknown token)",
    )
    finetune_epochs: int = Field(
        1, ge=0, description="fine-tuning (with distillation when there is a teacher) after pruning"
    )
    lr: float = Field(5e-5, gt=0.0, lt=1.0, description="learning rate of the fine-tuning")
    max_steps: int | None = Field(None, ge=1, description="stop the fine-tuning after this many optimiser steps")

    @model_validator(mode="after")
    def _removes_something(self) -> PruneConfig:
        if not (self.heads or self.ffn or self.sparsity or self.vocab):
            raise ValueError(
                "compress.prune removes nothing; set heads, ffn, vocab (structured) or sparsity (unstructured)"
            )
        return self


class QuantizeConfig(Strict):
    """ONNX export and int8 quantization of the latest stage."""

    onnx: bool = Field(True, description="export to ONNX (fp32), checked against eager every time")
    onnx_int8: bool = Field(True, description="ONNX Runtime dynamic int8")
    onnx_static_int8: bool = Field(False, description="ONNX Runtime static int8 (QDQ), calibrated on training texts")
    torch_int8: Literal["none", "weight-only", "dynamic"] = Field(
        "none", description="torchao int8 for the PyTorch backend (dynamic has no fast CPU kernels)"
    )
    calibration_samples: int = Field(128, ge=8, description="training texts for static int8 calibration")
    teacher: bool = Field(
        True,
        description="export the teacher the same way as the latest stage, so the budget can "
        "fall back to a quantized model that was not cut or retrained",
    )


class BudgetConfig(Strict):
    """Limits the deployable variant must keep; the pick is made on the validation split."""

    max_accuracy_drop: float = Field(1.0, ge=0.0, description="points of accuracy below the fp32 teacher")
    max_latency_ms: float | None = Field(None, gt=0.0, description="p50 latency at batch 1")
    max_size_mb: float | None = Field(None, gt=0.0, description="weights on disk")
    prefer: Literal["latency", "size", "throughput"] = Field(
        "latency", description="how to pick among variants in budget"
    )


class CompressConfig(Strict):
    """`keel run` compresses after training when this section is present; `keel compress RUN_DIR` does it later."""

    distill: DistillConfig | None = Field(None, description="distil into a smaller student; null = skip")
    prune: PruneConfig | None = Field(None, description="prune the latest model; null = skip")
    quantize: QuantizeConfig = QuantizeConfig()
    budget: BudgetConfig = BudgetConfig()
    bench_latency_samples: int = Field(100, ge=5, description="batch-1 requests timed per variant")
    bench_eval_samples: int = Field(1000, ge=10, description="test examples scored per variant")
    bench_rounds: int = Field(
        1,
        ge=1,
        le=10,
        description="times every variant is measured (the variants taking turns); each ratio to the pipeline "
        "is the median of the rounds' ratios, with its range",
    )
