"""Trust: explanations, fairness audits and mitigation, differential privacy, the model card.

explain.py   Captum integrated gradients on the word embeddings, attention rollout, global importance,
             ERASER faithfulness; ``explain_texts`` is the entry point other parts (the server) call
lexicon.py   the identity-term lexicon (lexicon.json): groups found in text, counterfactual swaps
fairness.py  Fairlearn MetricFrame per group, Borkan et al. AUCs, counterfactual flips, ThresholdOptimizer, gates
mitigation.py the ThresholdOptimizer's per-group thresholds, applied by `keel predict` and `keel serve` where sound
audit.py     `keel audit RUN_DIR`: runs the recipe's audit section on a finished run, writes audit/*.json, gates
privacy.py   DP-SGD with Opacus behind train.privacy: Poisson sampling, budget, accountant state in checkpoints
card.py      MODEL_CARD.md (Mitchell et al. 2019) from the run's own numbers
"""
