"""Alignment from human preferences: a reward model, DPO or RL (TRL), and LM bias metrics (lm_bias)."""
