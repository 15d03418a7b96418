"""Few-shot labels: episodes, heads over a classifier's features, SetFit-style pairs, and `keel fewshot`."""
