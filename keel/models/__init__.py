"""Built-in models by name, and loading of any local Hugging Face model folder."""

from keel.models.registry import MODELS, ModelSpec, model_dir, resolve_model

__all__ = ["MODELS", "ModelSpec", "model_dir", "resolve_model"]
