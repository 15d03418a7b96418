"""Recipe sections for learning after deployment: ``serve.feedback`` (the feedback route) and ``learn``
(`keel learn`: the challenger, its data and the promotion rule)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from keel.recipe.base import Strict

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(value, field: str = "learn.every", echo: bool = True) -> float:
    """``30m``, ``90s``, ``2h``, ``1d`` or a number of seconds -> seconds; ValueError naming ``field`` (and, with
    ``echo``, the value: a recipe's errors add it themselves) otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(value))
        if not m:
            got = f"; got {value!r}" if echo else ""
            raise ValueError(f"{field} must be a duration such as 90s, 30m, 2h or 1d (or seconds){got}")
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if seconds <= 0:
        raise ValueError(f"{field} must be more than 0 seconds" + (f"; got {value!r}" if echo else ""))
    return seconds


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
    """`keel learn RUN_DIR`: fine-tune a challenger on new feedback (a classifier: label feedback plus a replay sample
    of the run's training split; a causal LM: DPO on preferences, KTO on thumbs); promote it only when it beats the
    serving model on the feedback's held-out part by ``margin`` without losing more than ``max_old_drop`` (accuracy)
    or ``max_perplexity_rise`` (causal LMs) on the run's held-out split. `keel serve RUN --learn` runs rounds on the
    schedule ``every`` / ``min_feedback``."""

    margin: float = Field(
        0.01,
        ge=-100.0,
        le=100.0,
        description="accuracy the challenger must gain on the feedback's held-out part (causal LMs: preference "
        "accuracy for DPO, the log-prob margin of desirable over undesirable completions in nats per token for KTO; "
        "a large negative value such as -100: promote whatever it scores there, as a benchmark does to see every "
        "round)",
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
    min_feedback: int = Field(
        8,
        ge=1,
        description="usable feedback rows (label; causal LMs: thumbs and preferences) needed before a challenger is "
        "trained; `keel serve --learn` also waits for this many new rows since the last round",
    )
    epochs: int = Field(3, ge=1, le=100, description="epochs over the feedback + replay rows")
    lr: float | None = Field(None, gt=0.0, description="learning rate; default: train.lr")
    max_steps: int | None = Field(None, ge=1, description="cap on the challenger's optimiser steps")
    seed: int = Field(0, description="the replay sample and the challenger's data order")
    keep: int = Field(5, ge=2, description="promoted versions kept on disk (older ones are deleted, never the served)")
    method: Literal["auto", "dpo", "kto"] = Field(
        "auto",
        description="causal LMs: dpo (preference feedback), kto (thumbs; a preference gives one desirable and one "
        "undesirable completion), auto: dpo when the new feedback is preferences only, else kto",
    )
    beta: float = Field(0.1, gt=0.0, description="causal LMs: strength of the DPO/KTO pull to the serving model")
    max_perplexity_rise: float = Field(
        0.05,
        ge=0.0,
        description="causal LMs: relative rise of perplexity on the run's held-out split the challenger may have "
        "(0.05: 5%)",
    )
    every: float | None = Field(
        None,
        description="`keel serve RUN --learn`: how often to check for new feedback (90s, 30m, 2h, 1d or seconds); "
        "default 30m",
    )

    @field_validator("every", mode="before")
    @classmethod
    def _every(cls, value):
        return None if value is None else duration_seconds(value, echo=False)
