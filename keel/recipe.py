"""Recipes: one YAML file, typed and validated, drives a whole run.

A recipe is data, not code: pydantic models with ``extra="forbid"``, read with ``yaml.safe_load``,
and ``key.path=value`` overrides from the command line that go through the same validation.
This module imports no torch, so ``keel validate`` stays fast.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from keel.errors import RecipeError

BUILTIN_RECIPES = Path(__file__).parent / "recipes"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    """Which pretrained (or tiny random) transformer to start from."""

    name: str = Field("minilm-l6", description="registry name (see `keel ls`) or a local Hugging Face model folder")
    max_length: int = Field(128, ge=8, le=32768, description="tokens per example; longer texts are truncated")
    init: Literal["pretrained", "scratch"] = Field(
        "pretrained",
        description="scratch: random weights of the size preset model.name, with a tokenizer trained on the data (see pretrain)",
    )


class Columns(Strict):
    """Which columns of the data file hold the text, the label and (optionally) the group."""

    text: str = Field("text", description="column with the input text")
    label: str = Field("label", description="column with the label (classification)")
    group: str | None = Field(None, description="optional column kept for fairness audits")


class SplitConfig(Strict):
    """Deterministic train/validation/test split of a single data file."""

    validation: float = Field(0.1, ge=0.0, lt=1.0, description="share of examples held out for model selection")
    test: float = Field(0.1, ge=0.0, lt=1.0, description="share of examples held out for the final score")
    seed: int = Field(0, description="seed of the shuffle before splitting")
    stratify: bool = Field(True, description="keep the class balance in every split (classification)")

    @model_validator(mode="after")
    def _leaves_training_data(self) -> SplitConfig:
        if self.validation + self.test >= 0.9:
            raise ValueError(
                f"validation + test = {self.validation + self.test:g} leaves too little to train on; keep it under 0.9"
            )
        return self


class DataConfig(Strict):
    """Where examples come from: a built-in data set by name, or a CSV/JSONL/Parquet file."""

    name: str | None = Field(None, description="built-in data set (see `keel ls`)")
    path: str | None = Field(None, description="a .csv, .jsonl/.json or .parquet file")
    format: Literal["auto", "csv", "jsonl", "parquet"] = Field(
        "auto", description="file format; auto: from the file name"
    )
    encoding_errors: Literal["strict", "replace"] = Field(
        "strict", description="CSV bytes that are not UTF-8: fail, or replace them"
    )
    columns: Columns | None = Field(None, description="column mapping; defaults to the data set's own")
    labels: list[str] | None = Field(
        None, description="the label set, in order; default: sorted labels of the training split"
    )
    split: SplitConfig = SplitConfig()
    max_train_samples: int | None = Field(None, ge=1, description="cap on the training split")
    max_eval_samples: int | None = Field(None, ge=1, description="cap on the validation and test splits each")
    dedup: bool = Field(True, description="drop repeated texts before splitting, so no text is in two splits")

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.name is None) == (self.path is None):
            raise ValueError("set exactly one of data.name (a built-in data set) or data.path (a file)")
        return self


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
        if self.mixed_precision != "no":
            raise ValueError("train.privacy needs train.mixed_precision=no (per-example gradients in fp32)")
        if self.grad_accum_steps != 1:
            raise ValueError(
                "train.privacy: the Poisson batch is the logical batch; set train.grad_accum_steps=1 "
                "and raise train.batch_size instead"
            )
        return self


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
        description="times every variant is measured (round after round); "
        "each keeps its best timings, so a shared machine's slow spells skew no ratio",
    )


class ExplainConfig(Strict):
    """Token attributions (Captum integrated gradients), attention rollout, global importance, faithfulness."""

    n_steps: int = Field(32, ge=2, le=1024, description="integrated-gradients steps (Riemann trapezoid)")
    internal_batch_size: int = Field(64, ge=1, description="interpolated inputs per forward pass")
    max_examples: int = Field(64, ge=1, description="test texts explained for global importance and faithfulness")
    top_k: int = Field(3, ge=1, description="tokens removed/kept for ERASER comprehensiveness and sufficiency")
    top_tokens: int = Field(10, ge=1, description="tokens listed per class in the global importance")
    heatmaps: int = Field(8, ge=0, description="explained texts shown as heatmaps in the report")
    attention_rollout: bool = Field(True, description="also show attention rollout under each heatmap")
    seed: int = Field(0, description="seed of the random-token faithfulness baseline")


class FairnessGates(Strict):
    """Thresholds that fail the run (exit code 3) when crossed."""

    max_demographic_parity_difference: float | None = Field(
        None, ge=0.0, le=1.0, description="largest gap in selection rate between ranked groups"
    )
    max_equalized_odds_difference: float | None = Field(
        None, ge=0.0, le=1.0, description="largest gap in TPR or FPR between ranked groups"
    )
    min_group_accuracy: float | None = Field(
        None, ge=0.0, le=1.0, description="lowest accuracy any ranked group may have"
    )
    min_subgroup_auc: float | None = Field(None, ge=0.0, le=1.0, description="lowest subgroup AUC (Borkan et al.)")
    max_counterfactual_flip_rate: float | None = Field(
        None, ge=0.0, le=1.0, description="largest share of predictions an identity-term swap may flip"
    )
    on_unmeasurable: Literal["fail", "warn"] = Field(
        "fail",
        description="a gate with nothing to measure (every group below min_group_size, no swappable text) "
        "fails the run; warn: it is reported as not evaluated and the run goes on",
    )

    def thresholds(self) -> dict:
        """The gates that are set: name -> threshold."""
        return {k: v for k, v in self.model_dump().items() if k != "on_unmeasurable" and v is not None}


class FairnessConfig(Strict):
    """Per-group metrics (Fairlearn), Borkan AUCs, counterfactual swaps, mitigation."""

    groups: Literal["lexicon", "column"] = Field(
        "lexicon", description="identity terms found in the text (keel's lexicon), or the data.columns.group column"
    )
    categories: list[str] | None = Field(None, description="lexicon categories to audit; default: all")
    positive_label: str | None = Field(
        None, description="the outcome whose rates are compared; default: 'positive' if a label, else the last label"
    )
    min_group_size: int = Field(30, ge=1, description="smaller groups are flagged, not ranked")
    max_examples: int | None = Field(2000, ge=1, description="cap on the audited split")
    split: Literal["test", "validation"] = Field("test", description="the split audited")
    counterfactual: bool = Field(True, description="swap identity terms and count flipped predictions")
    mitigation: Literal["none", "threshold-optimizer", "counterfactual-augmentation"] = Field(
        "none", description="per-group thresholds (Fairlearn), or training on identity-swapped copies"
    )
    constraint: Literal["demographic_parity", "equalized_odds", "true_positive_rate_parity"] = Field(
        "equalized_odds", description="what the threshold optimizer equalizes"
    )
    baseline_run: str | None = Field(None, description="a run without mitigation, shown side by side")


class AuditConfig(Strict):
    """What `keel audit` (and `keel run`) check after training."""

    explain: ExplainConfig | None = Field(None, description="token attributions; null = skip")
    fairness: FairnessConfig | None = Field(None, description="per-group metrics; null = skip")
    gates: FairnessGates = FairnessGates()

    @model_validator(mode="after")
    def _gates_need_fairness(self) -> AuditConfig:
        if self.gates.thresholds() and self.fairness is None:
            raise ValueError(
                f"audit.gates ({', '.join(self.gates.thresholds())}) measure the fairness audit, which "
                "this recipe leaves out; add audit.fairness (e.g. audit.fairness.groups=lexicon) or "
                "remove the gates"
            )
        return self


class OutputConfig(Strict):
    """Where the run directory goes."""

    dir: str | None = Field(None, description="run directory; default runs/<name> (a free -N suffix is added)")


class ServeConfig(Strict):
    """`keel serve`: the OpenAI-compatible HTTP server. API keys never live here (KEEL_API_KEYS or --api-key-file)."""

    host: str = Field("127.0.0.1", description="bind address; a non-loopback one needs API keys (or --allow-no-auth)")
    port: int = Field(8000, ge=0, le=65535, description="0 picks a free port")
    backend: str = Field(
        "auto",
        description="classifiers: auto = the deployable variant picked by `keel compress`, else onnx-int8, "
        "then onnx when exported, else torch; or any variant name (e.g. pruned-onnx-int8, see `keel bench`)",
    )
    max_batch_size: int = Field(32, ge=1, le=1024, description="classify/embeddings: inputs gathered into one batch")
    forward_batch_size: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="classify/embeddings: a batch runs as length-sorted forward passes of this "
        "many inputs; default: 8 on a CPU, the whole batch on a GPU",
    )
    max_wait_ms: float = Field(5.0, ge=0.0, le=1000.0, description="classify/embeddings: wait for a fuller batch")
    max_running: int = Field(16, ge=1, le=512, description="generation: sequences in the running decode batch")
    max_queue: int = Field(256, ge=1, description="requests waiting beyond the running batch; more get 429")
    max_body_bytes: int = Field(2_000_000, ge=1024, description="request bodies over this get 413, unread")
    max_inputs: int = Field(256, ge=1, description="texts per classify/embeddings request")
    max_explain_inputs: int = Field(16, ge=1, description="texts per classify request with explain: true")
    max_tokens: int = Field(512, ge=1, description="upper bound on a request's max_tokens")
    default_max_tokens: int = Field(64, ge=1, description="max_tokens of a request that sets none")
    max_n: int = Field(8, ge=1, le=128, description="choices per completion request")
    max_stop: int = Field(4, ge=0, le=16, description="stop sequences per request")
    timeout_s: float = Field(60.0, gt=0.0, description="per-request deadline: 504, or an SSE error event")
    read_timeout_s: float = Field(
        10.0,
        gt=0.0,
        description="a request's headers, then its body, must arrive within "
        "this: else 408 (a slow client holds no connection and no drain)",
    )
    drain_timeout: float = Field(
        30.0,
        gt=0.0,
        description="SIGTERM: seconds the accepted requests get to finish "
        "before the process exits (what is still running then is cut)",
    )
    log_text: bool = Field(False, description="log prompts and completions (off: only sizes and timings)")
    public_docs: bool = Field(
        False,
        description="with API keys set, open /docs, /redoc and /openapi.json without "
        "a key (a browser cannot send one); the API routes still need a key",
    )
    num_threads: int | None = Field(
        None, ge=1, description="torch CPU threads; default: torch's choice (1 is faster on a busy machine)"
    )
    verify_key: str | None = Field(
        None,
        description="an EC public key (PEM file): serve only a run whose model "
        "folders match their `keel sign` signatures, checked before any weight is loaded",
    )


# -- generative models (issue 6): pretraining from scratch, supervised fine-tuning, alignment ------------------


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


class FederatedConfig(Strict):
    """Federated learning with Flower (`keel federate`): sites, strategy, rounds, SecAgg+, DP, validation."""

    class Partition(Strict):
        """How the simulation splits the data into sites."""

        kind: Literal["iid", "dirichlet", "column"] = Field(
            "iid", description="how the simulation splits the data into sites"
        )
        alpha: float = Field(0.5, gt=0.0, description="Dirichlet concentration for label skew (smaller = more skew)")
        column: str | None = Field(None, description="for kind=column: one site per value of this source column")
        seed: int = Field(0, description="seed of the partition")

    class Strategy(Strict):
        """How the server combines the sites' updates."""

        name: Literal["fedavg", "fedprox", "fedadam", "krum", "trimmed-mean"] = Field(
            "fedavg", description="aggregation rule"
        )
        proximal_mu: float = Field(0.01, ge=0.0, description="FedProx proximal term")
        server_lr: float = Field(0.01, gt=0.0, description="FedAdam server learning rate (eta)")
        num_malicious: int = Field(0, ge=0, description="Krum: poisoned sites to tolerate")
        trim_beta: float = Field(0.2, ge=0.0, lt=0.5, description="trimmed mean: fraction cut at each end")

    class SecAgg(Strict):
        """SecAgg+ secure aggregation: the server sees only the sum of the sites' updates."""

        enabled: bool = Field(False, description="mask updates with SecAgg+")
        num_shares: int = Field(3, ge=2, description="secret shares per site")
        reconstruction_threshold: int = Field(2, ge=2, description="shares needed to recover a dropped site's mask")
        clipping_range: float = Field(8.0, gt=0.0, description="values are clipped to +-this before quantization")
        quantization_range: int = Field(4194304, ge=2, description="integer range values are quantized to")

    class DP(Strict):
        """Client-level differential privacy (each site's whole data is the unit)."""

        mode: Literal["none", "central", "local"] = Field(
            "none", description="central: clip at the site, noise at the server"
        )
        epsilon: float | None = Field(
            None, gt=0.0, description="privacy budget; the noise is calibrated to it and enforced"
        )
        delta: float | None = Field(None, gt=0.0, lt=1.0, description="default 1/(10 * sites)")
        clipping_norm: float = Field(1.0, gt=0.0, description="L2 bound on each site's update")
        noise_multiplier: float | None = Field(None, ge=0.0, description="set it instead of epsilon (central mode)")

    class Server(Strict):
        """`keel federate serve`: address and TLS."""

        address: str = Field("127.0.0.1:9092", description="HOST:PORT that `keel federate serve` listens on")
        root_certificate: str | None = Field(None, description="CA certificate (PEM) for TLS")
        certificate: str | None = Field(None, description="server certificate (PEM), with private_key")
        private_key: str | None = Field(None, description="server private key (PEM); a path, never the key itself")
        round_timeout: float | None = Field(600.0, gt=0.0, description="seconds a round waits for its sites")

    sites: int = Field(10, ge=1, le=1_000_000, description="simulated sites (simulation) or expected sites (serve)")
    rounds: int = Field(5, ge=1, description="federated rounds")
    fraction_fit: float = Field(1.0, gt=0.0, le=1.0, description="share of sites sampled per round")
    min_fit_clients: int = Field(2, ge=1, description="sites that must train in a round")
    min_available_clients: int = Field(2, ge=1, description="sites that must be connected before a round starts")
    local_epochs: int = Field(1, ge=1, description="passes over its own data each site makes per round")
    local_steps: int | None = Field(None, ge=1, description="cap on local optimiser steps per round")
    local_optimizer: Literal["adamw", "sgd"] = Field("adamw", description="the sites' optimiser")
    local_lr: float | None = Field(None, gt=0.0, lt=1.0, description="default: train.lr")
    min_completion: float = Field(
        0.5, gt=0.0, le=1.0, description="a round needs this share of its sampled sites, else it is skipped"
    )
    max_update_norm: float | None = Field(None, gt=0.0, description="updates with a larger L2 norm are rejected")
    partition: Partition = Partition()
    strategy: Strategy = Strategy()
    secagg: SecAgg = SecAgg()
    dp: DP = DP()
    server: Server = Server()
    num_cpus: int = Field(2, ge=1, description="CPUs the simulation may use (Ray)")
    cpus_per_site: float = Field(
        1.0, gt=0.0, description="CPUs each simulated site takes (sites run in parallel up to num_cpus / this)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> FederatedConfig:
        if self.partition.kind == "column" and not self.partition.column:
            raise ValueError("partition.kind=column needs partition.column (the source column that names the site)")
        if self.secagg.enabled and self.secagg.reconstruction_threshold > self.secagg.num_shares:
            raise ValueError("secagg.reconstruction_threshold must be <= secagg.num_shares")
        if self.dp.mode == "local" and self.dp.epsilon is None:
            raise ValueError("dp.mode=local needs dp.epsilon (the per-round budget of each site's update)")
        if self.dp.mode == "central" and self.dp.epsilon is None and self.dp.noise_multiplier is None:
            raise ValueError("dp.mode=central needs dp.epsilon (a budget) or dp.noise_multiplier")
        for key in ("min_available_clients", "min_fit_clients"):
            if getattr(self, key) > self.sites:
                raise ValueError(
                    f"{key}={getattr(self, key)} is more than sites={self.sites}: the rounds would wait "
                    f"for sites that do not exist; lower it or raise federated.sites"
                )
        self._dp_accountable()
        return self

    def _dp_accountable(self) -> None:
        """Only settings whose privacy keel can state (keel/federated/privacy.py); checked here, without torch."""
        dp = self.dp
        if dp.mode == "none":
            return
        if dp.delta is not None and dp.delta >= 1.0 / self.sites:
            raise ValueError(
                f"dp.delta={dp.delta:g} is not below 1/sites={1 / self.sites:g}; a delta that large allows "
                f"naming a site outright: lower it (default 1/(10*sites))"
            )
        if dp.noise_multiplier is not None and dp.mode == "local":
            raise ValueError(
                "dp.noise_multiplier is for dp.mode=central; local DP calibrates each site's noise to dp.epsilon"
            )
        if dp.noise_multiplier == 0:
            raise ValueError(
                "dp.noise_multiplier=0 adds no noise (clipping alone is not DP); set it above 0 or set "
                "dp.epsilon instead"
            )
        if dp.mode == "central" and self.strategy.name in ("krum", "trimmed-mean"):
            why = (
                "Krum returns one site's update"
                if self.strategy.name == "krum"
                else "the trimmed mean cuts each coordinate by the other sites' values"
            )
            raise ValueError(
                f"strategy.name={self.strategy.name} with dp.mode=central: {why}, so one site can move "
                f"the result by more than clipping_norm/m and keel cannot calibrate the noise; use "
                f"strategy.name fedavg, fedprox or fedadam, or dp.mode=local (sites add their own noise)"
            )


class Recipe(Strict):
    """A whole run."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="names the run directory runs/<name>")
    task: Literal["classification", "causal-lm"] = Field("classification", description="label texts, or model language")
    model: ModelConfig = ModelConfig()
    data: DataConfig
    train: TrainConfig = TrainConfig()
    compress: CompressConfig | None = Field(None, description="compression after training; null = none")
    output: OutputConfig = OutputConfig()
    serve: ServeConfig = ServeConfig()
    pretrain: PretrainConfig = PretrainConfig()
    sft: SFTConfig | None = Field(None, description="supervised fine-tuning on chats (causal-lm)")
    align: AlignConfig | None = Field(None, description="alignment from preferences (causal-lm)")
    federated: FederatedConfig | None = Field(None, description="federated learning across sites (keel federate)")
    audit: AuditConfig | None = Field(None, description="explanations, fairness audit and gates")

    @model_validator(mode="after")
    def _metric_fits_task(self) -> Recipe:
        if self.task == "causal-lm" and self.train.metric in ("accuracy", "macro_f1"):
            raise ValueError(
                f"train.metric '{self.train.metric}' is for classification; use train.metric=loss for causal-lm"
            )
        if (self.model.init == "scratch" or self.sft or self.align) and self.task != "causal-lm":
            raise ValueError("model.init: scratch, sft and align are for causal language models; set task: causal-lm")
        if self.sft and self.align:
            raise ValueError("a recipe has either an sft or an align section, not both; run them as two recipes")
        if self.federated is not None and self.task != "classification":
            raise ValueError(
                f"keel federate trains classifiers; remove the federated: section from this {self.task} "
                "recipe, or set task: classification"
            )
        self._compress_fits()
        self._audit_fits()
        return self

    def _compress_fits(self) -> None:
        c = self.compress
        if c is not None and self.train.privacy is not None and (c.distill is not None or c.prune is not None):
            raise ValueError(
                "training stages after a differentially private run would spend privacy outside its "
                "accountant; compress a DP model by quantization only (unset compress.distill/prune)"
            )

    def _audit_fits(self) -> None:
        a = self.audit
        if a is None or self.task != "classification":  # causal LMs are not audited by keel audit
            return
        if a.explain is not None and self.data.split.test == 0:
            raise ValueError("audit.explain needs test examples; set data.split.test above 0")
        f = a.fairness
        if f is not None and getattr(self.data.split, f.split) == 0:
            raise ValueError(f"audit.fairness needs a non-empty {f.split} split; set data.split.{f.split} above 0")
        if (
            f is not None
            and f.positive_label is not None
            and self.data.labels is not None
            and f.positive_label not in map(str, self.data.labels)
        ):
            raise ValueError(
                f"audit.fairness.positive_label '{f.positive_label}' is not in data.labels "
                f"({', '.join(map(str, self.data.labels))}); pick one of them"
            )

    @property
    def selection_metric(self) -> str:
        return self.train.metric or ("macro_f1" if self.task == "classification" else "loss")

    def sha256(self) -> str:
        return recipe_hash(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def recipe_hash(recipe: Recipe) -> str:
    canonical = json.dumps(recipe.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUILTIN_RECIPES.glob("*.yaml"))}


def resolve_recipe_path(spec: str | Path) -> Path:
    """A file path, or the name of a built-in recipe."""
    path = Path(spec)
    if path.is_file():
        return path
    builtins = builtin_recipes()
    if str(spec) in builtins:
        return builtins[str(spec)]
    if path.exists():
        raise RecipeError(f"recipe '{spec}' is a directory; pass a .yaml file")
    names = ", ".join(builtins) or "none"
    raise RecipeError(f"recipe '{spec}' not found; pass a .yaml file or a built-in recipe ({names})")


# Recipe fields that name a file or folder. A relative path in a recipe file is relative to that file's folder (as in
# compose files), so a recipe beside its data runs from anywhere; one given as a key.path=value override, or in a
# built-in recipe, is relative to the working directory. Every one is made absolute before validation, so the run's
# recipe.yaml stands alone.
PATH_FIELDS = (
    "data.path",
    "output.dir",
    "audit.fairness.baseline_run",
    "federated.server.root_certificate",
    "federated.server.certificate",
    "federated.server.private_key",
)
# A registry name or a local model folder: taken as a folder when a Hugging Face folder (config.json) is there.
MODEL_FIELDS = ("model.name", "compress.distill.student")


def resolve_paths(raw: dict, base: Path) -> None:
    """Make the relative paths of a raw recipe absolute against ``base``, in place; absolute ones are kept."""
    for dotted in PATH_FIELDS + MODEL_FIELDS:
        *parents, leaf = dotted.split(".")
        node: Any = raw
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        value = node.get(leaf) if isinstance(node, dict) else None
        if not isinstance(value, str) or not value.strip():
            continue
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = base / path
        if dotted in MODEL_FIELDS and not (path / "config.json").is_file():
            continue  # a registry name (or a folder that is not there: resolve_model says so)
        node[leaf] = os.path.abspath(path)


def load_recipe(spec: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe. Raises RecipeError with one line per problem.

    Relative paths in the file are relative to the file's folder; those in overrides (and in built-in recipes) to
    the working directory (see PATH_FIELDS)."""
    path = resolve_recipe_path(spec)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}: malformed YAML{where}: {problem}; fix the syntax there") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a UTF-8 text file; a recipe is YAML text") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{path}: a recipe is a YAML mapping of sections (model, data, train, ...), got {type(raw).__name__}"
        )
    if path.resolve().parent != BUILTIN_RECIPES.resolve():
        resolve_paths(raw, path.resolve().parent)
    for item in overrides or []:
        apply_override(raw, item)
    return validate_recipe(raw, source=str(path))


def apply_override(raw: dict, item: str) -> None:
    """Apply one ``key.path=value`` override in place; the value is parsed as YAML (so 3 is an int)."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"override '{item}' is not key.path=value; for example train.lr=1e-4")
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise RecipeError(f"override '{item}': '{where}' is a value, not a section")
        node = child
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    node[parts[-1]] = parsed


def validate_recipe(raw: dict, source: str = "recipe") -> Recipe:
    """A raw recipe (its relative paths taken against the working directory) -> a Recipe, or one RecipeError line."""
    raw = copy.deepcopy(raw)
    resolve_paths(raw, Path.cwd())
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        lines = [_describe(err) for err in e.errors()]
        raise RecipeError(f"{source}: " + "; ".join(lines)) from None


def validate_serve(raw: dict, source: str = "serve options") -> ServeConfig:
    """The serve: section alone (`keel serve` options), checked and reported as in a recipe."""
    try:
        return ServeConfig.model_validate(raw)
    except ValidationError as e:
        lines = [_describe({**err, "loc": ("serve", *err["loc"])}) for err in e.errors()]
        raise RecipeError(f"{source}: " + "; ".join(lines)) from None


def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "recipe"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent, key = err["loc"][:-1], str(err["loc"][-1])
        known = _fields_at(parent)
        close = difflib.get_close_matches(key, known, n=1)
        hint = (
            f"did you mean '{'.'.join([*map(str, parent), close[0]])}'?" if close else f"known keys: {', '.join(known)}"
        )
        return f"unknown key '{loc}'; {hint}"
    if kind == "missing":
        return f"{loc} is required; add it to the recipe"
    got = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if isinstance(got, dict) else f"{loc}: {msg}; got {got!r}"


def _fields_at(loc: tuple) -> list[str]:
    model: Any = Recipe
    for part in loc:
        field = getattr(model, "model_fields", {}).get(str(part))
        if field is None:
            return []
        ann = field.annotation
        args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = args[0] if args else ann
    return list(getattr(model, "model_fields", {}))
