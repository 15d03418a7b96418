"""The recipe's ``fewshot:`` section: what `keel fewshot RUN_DIR --support FILE` does (keel/fewshot)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from keel.recipe.base import Strict


class ContrastiveConfig(Strict):
    """SetFit's first step: the encoder fine-tuned on pairs of rows (same label or not)."""

    iterations: int = Field(5, ge=1, le=100, description="per row and iteration: one same-label and one other pair")
    epochs: int = Field(1, ge=1, le=20, description="passes over the pairs")
    lr: float = Field(2e-5, gt=0, le=1.0, description="AdamW learning rate")
    batch_size: int = Field(16, ge=1, le=1024, description="pairs per optimiser step")
    max_pairs: int | None = Field(2000, ge=1, description="at most this many pairs (the first of the shuffled list)")


class MetaConfig(Strict):
    """Episodic training (prototypical networks) over the run's own labels, before the new ones are added."""

    episodes: int = Field(100, ge=1, le=100_000, description="episodes (one optimiser step each)")
    n_way: int | None = Field(None, ge=2, description="labels per episode; null = every label of the run, at most 5")
    k_shot: int = Field(4, ge=1, description="support rows per label in an episode")
    n_query: int = Field(4, ge=1, description="query rows per label in an episode (never in its support)")
    lr: float = Field(2e-5, gt=0, le=1.0, description="AdamW learning rate")


class FewshotConfig(Strict):
    """`keel fewshot`: labels added to a trained classifier from a few examples each, saved as a new run."""

    method: Literal["prototype", "setfit"] = Field(
        "prototype",
        description="prototype: the encoder as trained, a class-mean head over its features; setfit: contrastive "
        "fine-tuning on pairs, then a logistic-regression head",
    )
    k_shot: int | None = Field(None, ge=1, description="use at most this many support rows per label; null = all")
    text_column: str = Field("text", min_length=1, description="text column of the support file")
    label_column: str = Field("label", min_length=1, description="label column of the support file")
    old_examples: int = Field(
        64, ge=1, description="setfit/meta: training rows per existing label that its refitted head row is fitted on"
    )
    eval_examples: int = Field(
        500, ge=0, description="validation and test rows of the existing labels scored before and after (each)"
    )
    max_old_drop: float = Field(
        0.02,
        ge=0.0,
        le=1.0,
        description="refuse to write the run if the existing labels' validation accuracy drops by more than this",
    )
    contrastive: ContrastiveConfig = ContrastiveConfig()
    meta: MetaConfig | None = Field(None, description="episodic training before the head; null = none")
    seed: int = Field(0, description="sampling and training seed")
    output_dir: str | None = Field(None, description="the new run's folder; null = RUN_DIR-fewshot (or -fewshot-N)")
