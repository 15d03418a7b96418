"""Recipe sections for training: train.* (early stopping, DP-SGD privacy)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from keel.recipe.base import Strict
from keel.recipe.parallel import ParallelConfig


class EarlyStopping(Strict):
    """Stop when the selection metric stops improving on the validation split."""

    patience: int = Field(2, ge=1, description="evaluations without improvement before stopping")
    min_delta: float = Field(0.0, ge=0.0, description="smallest change that counts as an improvement")


class PrivacyConfig(Strict):
    """DP-SGD (Opacus): per-example clipping, Gaussian noise, Poisson sampling, a privacy accountant."""

    target_epsilon: float = Field(8.0, gt=0.0, description="the budget; training stops at the last step within it")
    delta: float = Field(1e-5, gt=0.0, lt=1.0, description="must be below 1/N (N = training examples)")
    max_grad_norm: float = Field(1.0, gt=0.0, description="per-example gradient clipping bound")
    accountant: Literal["prv", "rdp"] = Field("prv", description="privacy accountant (Opacus)")
    noise_multiplier: float | None = Field(
        None, gt=0.0, description="sigma; default: the smallest that keeps the planned steps within the budget"
    )
    poisson_sampling: bool = Field(
        True,
        description="each example joins each step with probability batch_size/N "
        "(the only sampling keel's accountants account for; false is refused)",
    )
    max_physical_batch_size: int = Field(
        32,
        ge=1,
        description="examples per forward/backward pass; a larger logical batch is processed in chunks "
        "(per-example gradients take batch x trainable parameters of memory)",
    )
    freeze_embeddings: bool = Field(
        True,
        description="train without the token/position embedding tables: their per-example gradients are the "
        "largest (vocab x hidden per example) and the noise added to them the most",
    )

    @field_validator("poisson_sampling")
    @classmethod
    def _poisson_only(cls, v: bool) -> bool:
        # Shuffled fixed-size batches are not what the PRV/RDP accountants analyse (they assume Poisson
        # subsampling); reporting their epsilon for such a run would state a guarantee the run does not have.
        if not v:
            raise ValueError(
                "fixed-size shuffled batches have no accountant in keel (the PRV and RDP accountants "
                "assume Poisson sampling, and their epsilon would not hold); set "
                "train.privacy.poisson_sampling=true"
            )
        return v


class TrainConfig(Strict):
    """The training loop: optimiser, schedule, precision, evaluation and checkpoints."""

    epochs: int = Field(3, ge=1, description="passes over the training split")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimiser steps")
    batch_size: int = Field(16, ge=1, description="examples per process per micro-batch")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per optimiser step")
    eval_batch_size: int = Field(64, ge=1, description="examples per batch when evaluating")
    group_by_length: bool = Field(
        False,
        description="batch examples of similar length (shuffled, then sorted "
        "within groups of up to 50 batches, as transformers' Trainer does): less padding, faster epochs on texts of "
        "mixed length",
    )
    lr: float = Field(5e-5, gt=0.0, lt=1.0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay")
    warmup_ratio: float = Field(
        0.06, ge=0.0, lt=1.0, description="share of the steps spent warming the learning rate up"
    )
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="learning-rate decay after warm-up")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="gradient clipping; null = none")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="autocast precision (bf16/fp16 on a GPU)")
    seed: int = Field(42, description="seed of the weights, the data order and dropout")
    deterministic: bool = Field(True, description="deterministic kernels: exact, resumable loss curves")
    metric: Literal["accuracy", "macro_f1", "loss"] | None = Field(
        None, description="selects the best model; default macro_f1 for classification, loss for causal-lm"
    )
    early_stopping: EarlyStopping | None = Field(None, description="stop early; null = train every epoch")
    checkpoint_every: int = Field(0, ge=0, description="optimiser steps between checkpoints; 0 = each epoch")
    keep_last_k: int = Field(2, ge=1, description="checkpoints kept on disk")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; default: torch's choice")
    privacy: PrivacyConfig | None = Field(None, description="differentially private training (DP-SGD)")
    parallel: ParallelConfig = Field(
        ParallelConfig(), description="several processes: ddp (whole replicas) or fsdp (shards); Ray Train workers"
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `no` as False.
        return "no" if v is False else v

    @model_validator(mode="after")
    def _privacy_fits(self) -> TrainConfig:
        if not self.privacy:
            return self
        if self.group_by_length:
            raise ValueError(
                "group_by_length does not apply to DP-SGD (train.privacy), whose Poisson sampling picks batches; "
                "set train.group_by_length=false"
            )
        if self.parallel.strategy == "fsdp":
            raise ValueError("train.privacy computes per-example gradients of whole weights; set train.parallel=ddp")
        if self.mixed_precision != "no":
            raise ValueError("train.privacy needs train.mixed_precision=no (per-example gradients in fp32)")
        if self.grad_accum_steps != 1:
            raise ValueError(
                "train.privacy: the Poisson batch is the logical batch; set train.grad_accum_steps=1 "
                "and raise train.batch_size instead"
            )
        return self
