"""Recipe sections for the model and the data: model.*, data.* (columns, splits; data.augment and data.weak live
in keel/recipe/label.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from keel.recipe.base import Strict
from keel.recipe.curate import CurateConfig
from keel.recipe.label import AugmentConfig, WeakConfig


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
    curate: CurateConfig | None = Field(
        None, description="curation before the splits are frozen: PII, quality, dedup, label errors; null = none"
    )
    augment: AugmentConfig | None = Field(None, description="copies of the training texts (keel/augment/text.py)")
    weak: WeakConfig | None = Field(None, description="labels from labelling functions (keel/data/weak.py)")

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.name is None) == (self.path is None):
            raise ValueError("set exactly one of data.name (a built-in data set) or data.path (a file)")
        return self
