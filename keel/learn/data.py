"""What a challenger learns from and is judged on: label feedback (deduplicated, split by text hash into a
training part and a held-out part that stays held out in every round), and a replay sample of the run's
frozen training split."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from keel.errors import KeelError


@dataclass
class FeedbackData:
    train: pd.DataFrame  # text, label
    heldout: pd.DataFrame
    rows: int  # label feedback rows read (new since the last promotion)
    unusable: dict  # why rows were left out -> how many
    last_id: int  # the newest row read


def heldout_share(sha256: str) -> float:
    """A text's place in [0, 1) from its hash: the same text is held out (or not) in every round."""
    return int(sha256[:8], 16) / 16**8


def label_feedback(rows: list[dict], labels: list[str], holdout: float) -> FeedbackData:
    """Rows of the feedback database -> the texts and corrected labels to learn from; the latest label of a
    text wins. Raises KeelError when every row lacks its text (serve.feedback.store_text was off)."""
    unusable = {"no_text": 0, "unknown_label": 0, "not_classify": 0}
    latest: dict[str, dict] = {}
    for r in rows:
        if r["route"] != "classify":
            unusable["not_classify"] += 1
        elif r["input_text"] is None:
            unusable["no_text"] += 1
        elif r["label"] not in labels:
            unusable["unknown_label"] += 1
        else:
            latest[r["input_sha256"]] = r
    if rows and not latest and unusable["no_text"]:
        raise KeelError(
            f"{unusable['no_text']} label feedback row(s) hold only the SHA-256 of their text "
            "(serve.feedback.store_text was false when they were sent); set serve.feedback.store_text: true "
            "in the run's recipe.yaml, restart the server and collect feedback again"
        )
    kept = list(latest.values())
    frame = pd.DataFrame(
        {"text": [r["input_text"] for r in kept], "label": [r["label"] for r in kept]}, columns=["text", "label"]
    )
    held = [heldout_share(r["input_sha256"]) < holdout for r in kept]
    mask = pd.Series(held, dtype=bool, index=frame.index)
    return FeedbackData(
        frame[~mask].reset_index(drop=True),
        frame[mask].reset_index(drop=True),
        len(rows),
        {k: v for k, v in unusable.items() if v},
        max((r["id"] for r in rows), default=0),
    )


def replay_sample(train: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """``n`` rows of the run's training split (all of it when it is smaller), drawn with ``seed``."""
    n = min(n, len(train))
    return (
        train.sample(n=n, random_state=seed)[["text", "label"]].reset_index(drop=True)
        if n
        else train[:0][["text", "label"]]
    )


def mixed(feedback: pd.DataFrame, replay: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Feedback and replay rows in one shuffled frame (a replayed text the feedback corrects is dropped)."""
    replay = replay[~replay["text"].isin(set(feedback["text"]))]
    both = pd.concat([feedback, replay], ignore_index=True)
    return both.sample(frac=1.0, random_state=seed).reset_index(drop=True)
