"""Label-preserving augmentation of the training split (recipe ``data.augment``): text operations in text.py,
paraphrases by a causal LM in paraphrase.py. A package of its own because it builds on both keel.data and the
fairness lexicon in keel.trust (which itself reads keel.data)."""
