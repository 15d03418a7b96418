"""Recipe sections for enriching the training data: data.augment (label-preserving copies) and data.weak
(labelling functions and a label model). See keel/augment/text.py and keel/data/weak.py."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from keel.recipe.base import Strict

AUGMENT_OPS = ("synonym", "insert", "swap", "delete", "typo", "identity", "paraphrase")
AugmentOp = Literal["synonym", "insert", "swap", "delete", "typo", "identity", "paraphrase"]


class AugmentConfig(Strict):
    """Augmented copies of the training texts (after the frozen splits; validation and test are never touched)."""

    ops: list[AugmentOp] = Field(
        ["synonym", "insert", "swap", "delete"],
        description="operations: EDA's synonym/insert/swap/delete, typo noise, identity (counterfactual swap of the "
        "fairness lexicon's terms), paraphrase (a built-in causal LM; slow, only when listed)",
    )
    copies: int = Field(4, ge=1, le=32, description="copies per training text, each by one operation picked at random")
    alpha: float = Field(0.1, gt=0.0, le=0.5, description="share of a text's words each EDA operation changes")
    typo_rate: float = Field(0.05, gt=0.0, le=0.3, description="typo: chance that each letter is hit")
    seed: int = Field(0, description="seed of the copies: the same recipe gives the same copies")
    paraphrase_model: str = Field("smollm2-135m", description="paraphrase: the causal LM (registry name or folder)")
    max_paraphrases: int = Field(200, ge=1, description="paraphrase: how many training texts get one, at most")

    @field_validator("ops")
    @classmethod
    def _some_ops(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"list at least one of {', '.join(AUGMENT_OPS)}; or remove data.augment")
        if len(set(v)) != len(v):
            raise ValueError("each operation once")
        return v


class WeakConfig(Strict):
    """Labels from labelling functions, combined by a label model; the model then trains on them."""

    functions: str = Field(
        ...,
        description="a .py file beside the recipe whose lf_* functions take a text and return a label or None "
        "(user code: keel imports it only for runs that use it), or a built-in set: tweets-sentiment",
    )
    unlabeled: str | None = Field(
        None,
        description="a file of unlabelled texts (the data.columns.text column) to label and add to the training "
        "split; default: relabel the training split itself (its own labels then only score the functions)",
    )
    label_model: Literal["auto", "snorkel", "majority"] = Field(
        "auto",
        description="what the model trains on: Snorkel's LabelModel, majority vote, or auto: the one whose labels of "
        "the validation split agree more with its real labels (majority vote on a tie); both are reported",
    )
    class_balance: Literal["validation", "learned"] = Field(
        "validation",
        description="the label model's class prior: the validation split's label shares, or learned from the votes",
    )
    # epochs, lr and the validation prior: the best of 48 settings on benchmarks/weak_tweets.py's validation split
    epochs: int = Field(100, ge=1, le=100000, description="label model training epochs")
    lr: float = Field(0.001, gt=0.0, le=1.0, description="label model learning rate")
    l2: float = Field(0.0, ge=0.0, description="label model L2 regularisation (towards its initial accuracies)")
    seed: int = Field(0, description="seed of the label model")
    min_confidence: float = Field(
        0.0, ge=0.0, lt=1.0, description="drop texts whose label-model probability is below this (0: keep all voted)"
    )
