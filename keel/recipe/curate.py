"""Recipe section data.curate: what keel does to the rows after splitting and before freezing them (keel/data/curate)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from keel.recipe.base import Strict

PII_TYPES = (
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "URL",
    "IP_ADDRESS",
    "CREDIT_CARD",
    "IBAN_CODE",
    "CRYPTO",
    "US_SSN",
    "MAC_ADDRESS",
)


class DedupConfig(Strict):
    """Exact and MinHash-LSH near-duplicate removal in the training split, and its contamination check."""

    exact: bool = Field(True, description="drop training texts equal to an earlier one after normalising")
    near: bool = Field(
        True,
        description="drop training texts whose Jaccard similarity to an earlier one "
        "is at least threshold (candidates from MinHash LSH, datasketch)",
    )
    threshold: float = Field(0.8, gt=0.0, le=1.0, description="Jaccard similarity of character shingles, in (0, 1]")
    shingle: int = Field(5, ge=1, le=64, description="characters per shingle of the normalised text")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (more: fewer missed pairs, slower)")
    contamination: bool = Field(
        True, description="drop training texts that are near-duplicates of a validation or test text"
    )
    seed: int = Field(1, description="MinHash seed")


class QualityConfig(Strict):
    """Heuristic filters of the training split; each rule's count is reported (a text may fail several)."""

    min_words: int = Field(1, ge=0, description="fewer words: dropped")
    max_chars: int | None = Field(None, ge=1, description="longer texts: dropped; null = no bound")
    max_symbol_ratio: float = Field(
        0.5, ge=0.0, le=1.0, description="share of characters that are neither letters, digits nor spaces"
    )
    max_repeated_ngrams: float = Field(
        0.5, ge=0.0, le=1.0, description="share of word n-grams that repeat an earlier one in the same text"
    )
    ngram: int = Field(3, ge=1, le=10, description="n of the repeated n-gram rule")
    max_garbled_ratio: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="share of replacement (U+FFFD) or control characters; a text without "
        "any letter or digit is garbled too",
    )


class PiiConfig(Strict):
    """PII scrubbing with Presidio's pattern recognizers (no NER model: PERSON and LOCATION are not scrubbed)."""

    entities: list[Literal[PII_TYPES]] | None = Field(  # type: ignore[valid-type]
        None, description=f"types to scrub; default: all of {', '.join(PII_TYPES)}"
    )
    min_score: float = Field(0.4, ge=0.0, le=1.0, description="lowest Presidio score that is replaced")


class LabelErrorsConfig(Strict):
    """Label errors by confident learning (Northcutt et al. 2021) on out-of-fold probabilities of a linear probe."""

    action: Literal["flag", "drop", "relabel"] = Field(
        "flag", description="flag: report only; drop: remove them from training; relabel: use the suggested label"
    )
    features: Literal["minilm-l6", "tfidf"] = Field(
        "minilm-l6", description="what the probe sees: frozen MiniLM sentence embeddings, or TF-IDF word n-grams"
    )
    folds: int = Field(5, ge=2, le=20, description="k of the k-fold out-of-fold probabilities")
    seed: int = Field(0, description="fold assignment seed")


class CurateConfig(Strict):
    """Curation of the split rows before they are frozen: PII scrubbing (every split), then, in the training split
    only, quality filters, deduplication, contamination removal and label errors. null turns a step off."""

    pii: PiiConfig | None = Field(PiiConfig(), description="PII scrubbing of every split; null = off")
    quality: QualityConfig | None = Field(QualityConfig(), description="quality filters; null = off")
    dedup: DedupConfig | None = Field(DedupConfig(), description="exact / near dedup and contamination; null = off")
    label_errors: LabelErrorsConfig | None = Field(
        None, description="confident learning on the training split (classification); null = off"
    )

    @model_validator(mode="after")
    def _something(self) -> CurateConfig:
        if not any((self.pii, self.quality, self.dedup, self.label_errors)):
            raise ValueError("data.curate turns every step off; remove the section or enable a step")
        return self
