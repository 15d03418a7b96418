"""Curation of a run's splits before they are frozen (recipe ``data.curate``): PII scrubbing, quality filters,
deduplication, cross-split contamination and label errors; results cached by content hash. See steps.py."""

from keel.data.curate.steps import CURATE_JSON, PROBS_FILE, curate_splits

__all__ = ["CURATE_JSON", "PROBS_FILE", "curate_splits"]
