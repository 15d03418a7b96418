"""Recipe sections for learning after deployment: ``serve.feedback`` (the feedback route) and ``learn``
(`keel learn`: the challenger, its data and the promotion rule)."""

from __future__ import annotations

from pydantic import Field

from keel.recipe.base import Strict


class FeedbackConfig(Strict):
    """`POST /v1/feedback` on a served run: stored append-only in RUN/feedback/feedback.sqlite."""

    enabled: bool = Field(True, description="accept feedback on a served run directory (and remember responses)")
    store_text: bool = Field(
        False,
        description="keep the served input and output texts with each feedback row (`keel learn` needs them); "
        "off: only their SHA-256",
    )
    remember: int = Field(
        100_000, ge=1, le=10_000_000, description="the last responses (ids) that feedback may name, held in memory"
    )
    poll_s: float = Field(
        2.0,
        ge=0.0,
        description="seconds between checks of the run's model version (learn/state.json): a promoted or "
        "rolled-back version is swapped in without a failed request; 0: never",
    )


class LearnConfig(Strict):
    """`keel learn RUN_DIR`: fine-tune a challenger on new label feedback plus a replay sample of the run's training
    split; promote it only when it beats the serving model on the feedback's held-out part by ``margin`` without
    losing more than ``max_old_drop`` on the run's validation split."""

    margin: float = Field(
        0.01,
        ge=-1.0,
        le=1.0,
        description="accuracy the challenger must gain on the feedback's held-out part (-1: promote whatever it "
        "scores there, as a benchmark does to see every round)",
    )
    max_old_drop: float = Field(
        0.01, ge=0.0, le=1.0, description="accuracy the challenger may lose on the run's frozen validation split"
    )
    replay: float = Field(
        1.0,
        ge=0.0,
        le=100.0,
        description="rows of the run's training split replayed per feedback row (against forgetting); 0: none",
    )
    holdout: float = Field(
        0.25, gt=0.0, lt=1.0, description="share of the feedback texts held out to judge the challenger (by text hash)"
    )
    min_feedback: int = Field(8, ge=1, description="label feedback rows needed before a challenger is trained")
    epochs: int = Field(3, ge=1, le=100, description="epochs over the feedback + replay rows")
    lr: float | None = Field(None, gt=0.0, description="learning rate; default: train.lr")
    max_steps: int | None = Field(None, ge=1, description="cap on the challenger's optimiser steps")
    seed: int = Field(0, description="the replay sample and the challenger's data order")
    keep: int = Field(5, ge=2, description="promoted versions kept on disk (older ones are deleted, never the served)")
