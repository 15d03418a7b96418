"""Data: built-in data sets, user files, deterministic splits and the tokenized cache."""
