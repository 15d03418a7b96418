"""Recipe sections for causal LMs: pretrain.*, sft.* (LoRA), align.*."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from keel.recipe.base import Strict


class PretrainConfig(Strict):
    """model.init: scratch: a byte-level BPE tokenizer trained on the training split, random weights of a preset."""

    vocab_size: int = Field(
        4096, ge=260, le=262144, description="BPE vocabulary, including the 256 bytes and special tokens"
    )
    min_frequency: int = Field(2, ge=1, description="merges seen fewer times than this are not learned")
    samples: int = Field(
        3, ge=0, le=32, description="sample generations from the test split's openings, for the report"
    )
    sample_tokens: int = Field(48, ge=1, le=1024, description="tokens generated per sample")
    compile: bool = Field(True, description="torch.compile the model when training on a CUDA GPU (ignored on CPU)")


class LoraConfig(Strict):
    """A LoRA adapter (peft): low-rank updates of the chosen modules; the base weights stay frozen."""

    r: int = Field(8, ge=1, le=1024, description="rank of the update matrices")
    alpha: float = Field(16.0, gt=0, description="scale of the update (alpha / r)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt, or all-linear"
    )
    layers: int | None = Field(
        None,
        ge=1,
        description="adapt only the top N transformer blocks (backward stops there: "
        "much faster on a CPU); null = all blocks",
    )


class SFTConfig(Strict):
    """Supervised fine-tuning on chat/instruction JSONL (`messages`, or `prompt` + `response`): loss on responses only."""

    method: Literal["full", "lora"] = Field("lora", description="train every weight, or a LoRA adapter")
    lora: LoraConfig = LoraConfig()
    merge: bool = Field(True, description="merge the LoRA adapter into the weights of model/ (for export and serving)")


class AlignConfig(Strict):
    """Alignment from preferences (`prompt`, `chosen`, `rejected`; or data.name: crows-pairs): reward model + DPO or RL."""

    method: Literal["dpo", "grpo", "rloo"] = Field(
        "dpo", description="DPO from the pairs, or RL (GRPO/RLOO) against the reward model"
    )
    beta: float = Field(0.1, gt=0.0, description="strength of the KL pull to the frozen reference model")
    lora: LoraConfig | None = Field(
        LoraConfig(r=16, alpha=32.0), description="train the policy as a LoRA adapter (merged at the end); null = full"
    )
    reward_steps: int = Field(60, ge=1, description="optimiser steps of reward-model training")
    reward_lr: float = Field(5e-5, gt=0.0, lt=1.0, description="learning rate of the reward model")
    reward_layers: int | None = Field(
        None, ge=1, description="train only the reward model's top N blocks and its head; null = all"
    )
    policy_steps: int = Field(30, ge=1, description="optimiser steps of DPO / RL")
    num_generations: int = Field(4, ge=2, description="RL: completions sampled per prompt")
    max_new_tokens: int = Field(16, ge=1, le=512, description="RL sampling and win-rate generations")
    eval_pairs: int | None = Field(None, ge=1, description="cap on held-out pairs scored before/after")
    win_rate_prompts: int = Field(32, ge=1, description="held-out prompts for the reward-model win rate")
    perplexity_blocks: int = Field(16, ge=0, description="held-out Shakespeare blocks for the alignment tax; 0 = skip")
