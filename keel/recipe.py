"""Recipes: one YAML file, typed and validated, drives a whole run.

A recipe is data, not code: pydantic models with ``extra="forbid"``, read with ``yaml.safe_load``,
and ``key.path=value`` overrides from the command line that go through the same validation.
This module imports no torch, so ``keel validate`` stays fast.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from keel.errors import RecipeError

BUILTIN_RECIPES = Path(__file__).parent / "recipes"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    """Which pretrained (or tiny random) transformer to start from."""

    name: str = Field("minilm-l6", description="registry name (see `keel ls`) or a local Hugging Face model folder")
    max_length: int = Field(128, ge=8, le=32768, description="tokens per example; longer texts are truncated")


class Columns(Strict):
    text: str = "text"
    label: str = "label"
    group: str | None = Field(None, description="optional column kept for fairness audits")


class SplitConfig(Strict):
    """Deterministic train/validation/test split of a single data file."""

    validation: float = Field(0.1, ge=0.0, lt=1.0)
    test: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0
    stratify: bool = True

    @model_validator(mode="after")
    def _leaves_training_data(self) -> "SplitConfig":
        if self.validation + self.test >= 0.9:
            raise ValueError(f"validation + test = {self.validation + self.test:g} leaves too little to train on; keep it under 0.9")
        return self


class DataConfig(Strict):
    """Where examples come from: a built-in data set by name, or a CSV/JSONL/Parquet file."""

    name: str | None = Field(None, description="built-in data set (see `keel ls`)")
    path: str | None = Field(None, description="a .csv, .jsonl/.json or .parquet file")
    format: Literal["auto", "csv", "jsonl", "parquet"] = "auto"
    encoding_errors: Literal["strict", "replace"] = Field("strict", description="CSV bytes that are not UTF-8: fail, or replace them")
    columns: Columns | None = Field(None, description="column mapping; defaults to the data set's own")
    labels: list[str] | None = Field(None, description="the label set, in order; default: sorted labels of the training split")
    split: SplitConfig = SplitConfig()
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1, description="cap on the validation and test splits each")
    dedup: bool = Field(True, description="drop repeated texts before splitting, so no text is in two splits")

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if (self.name is None) == (self.path is None):
            raise ValueError("set exactly one of data.name (a built-in data set) or data.path (a file)")
        return self


class EarlyStopping(Strict):
    patience: int = Field(2, ge=1, description="evaluations without improvement before stopping")
    min_delta: float = Field(0.0, ge=0.0)


class PrivacyConfig(Strict):
    """DP-SGD (Opacus): per-example clipping, Gaussian noise, Poisson sampling, a privacy accountant."""

    target_epsilon: float = Field(8.0, gt=0.0, description="the budget; training stops at the last step within it")
    delta: float = Field(1e-5, gt=0.0, lt=1.0, description="must be below 1/N (N = training examples)")
    max_grad_norm: float = Field(1.0, gt=0.0, description="per-example gradient clipping bound")
    accountant: Literal["prv", "rdp"] = "prv"
    noise_multiplier: float | None = Field(
        None, gt=0.0, description="sigma; default: the smallest that keeps the planned steps within the budget")
    poisson_sampling: bool = Field(True, description="each example joins each step with probability batch_size/N")
    freeze_embeddings: bool = Field(
        True, description="train without the token/position embedding tables: their per-example gradients are the "
                          "largest (vocab x hidden per example) and the noise added to them the most")


class TrainConfig(Strict):
    """The training loop: optimiser, schedule, precision, evaluation and checkpoints."""

    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimiser steps")
    batch_size: int = Field(16, ge=1, description="examples per process per micro-batch")
    grad_accum_steps: int = Field(1, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    lr: float = Field(5e-5, gt=0.0, lt=1.0)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_ratio: float = Field(0.06, ge=0.0, lt=1.0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 42
    deterministic: bool = Field(True, description="deterministic kernels: exact, resumable loss curves")
    metric: Literal["accuracy", "macro_f1", "loss"] | None = Field(
        None, description="selects the best model; default macro_f1 for classification, loss for causal-lm")
    early_stopping: EarlyStopping | None = None
    checkpoint_every: int = Field(0, ge=0, description="optimiser steps between checkpoints; 0 = each epoch")
    keep_last_k: int = Field(2, ge=1)
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; default: torch's choice")
    privacy: PrivacyConfig | None = Field(None, description="differentially private training (DP-SGD)")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `no` as False.
        return "no" if v is False else v


class ExplainConfig(Strict):
    """Token attributions (Captum integrated gradients), attention rollout, global importance, faithfulness."""

    n_steps: int = Field(32, ge=2, le=1024, description="integrated-gradients steps (Riemann trapezoid)")
    internal_batch_size: int = Field(64, ge=1, description="interpolated inputs per forward pass")
    max_examples: int = Field(64, ge=1, description="test texts explained for global importance and faithfulness")
    top_k: int = Field(3, ge=1, description="tokens removed/kept for ERASER comprehensiveness and sufficiency")
    top_tokens: int = Field(10, ge=1, description="tokens listed per class in the global importance")
    heatmaps: int = Field(8, ge=0, description="explained texts shown as heatmaps in the report")
    attention_rollout: bool = True
    seed: int = 0


class FairnessGates(Strict):
    """Thresholds that fail the run (exit code 3) when crossed."""

    max_demographic_parity_difference: float | None = Field(None, ge=0.0, le=1.0)
    max_equalized_odds_difference: float | None = Field(None, ge=0.0, le=1.0)
    min_group_accuracy: float | None = Field(None, ge=0.0, le=1.0)
    min_subgroup_auc: float | None = Field(None, ge=0.0, le=1.0)
    max_counterfactual_flip_rate: float | None = Field(None, ge=0.0, le=1.0)


class FairnessConfig(Strict):
    """Per-group metrics (Fairlearn), Borkan AUCs, counterfactual swaps, mitigation."""

    groups: Literal["lexicon", "column"] = Field(
        "lexicon", description="identity terms found in the text (keel's lexicon), or the data.columns.group column")
    categories: list[str] | None = Field(None, description="lexicon categories to audit; default: all")
    positive_label: str | None = Field(
        None, description="the outcome whose rates are compared; default: 'positive' if a label, else the last label")
    min_group_size: int = Field(30, ge=1, description="smaller groups are flagged, not ranked")
    max_examples: int | None = Field(2000, ge=1, description="cap on the audited split")
    split: Literal["test", "validation"] = "test"
    counterfactual: bool = True
    mitigation: Literal["none", "threshold-optimizer", "counterfactual-augmentation"] = "none"
    constraint: Literal["demographic_parity", "equalized_odds", "true_positive_rate_parity"] = Field(
        "equalized_odds", description="what the threshold optimizer equalizes")
    baseline_run: str | None = Field(None, description="a run without mitigation, shown side by side")


class AuditConfig(Strict):
    """What `keel audit` (and `keel run`) check after training."""

    explain: ExplainConfig | None = None
    fairness: FairnessConfig | None = None
    gates: FairnessGates = FairnessGates()


class OutputConfig(Strict):
    dir: str | None = Field(None, description="run directory; default runs/<name> (a free -N suffix is added)")


class Recipe(Strict):
    """A whole run."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    task: Literal["classification", "causal-lm"] = "classification"
    model: ModelConfig = ModelConfig()
    data: DataConfig
    train: TrainConfig = TrainConfig()
    output: OutputConfig = OutputConfig()
    audit: AuditConfig | None = Field(None, description="explanations, fairness audit and gates")

    @model_validator(mode="after")
    def _metric_fits_task(self) -> "Recipe":
        if self.task == "causal-lm" and self.train.metric in ("accuracy", "macro_f1"):
            raise ValueError(f"train.metric '{self.train.metric}' is for classification; use train.metric=loss for causal-lm")
        return self

    @property
    def selection_metric(self) -> str:
        return self.train.metric or ("macro_f1" if self.task == "classification" else "loss")

    def sha256(self) -> str:
        return recipe_hash(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def recipe_hash(recipe: Recipe) -> str:
    canonical = json.dumps(recipe.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUILTIN_RECIPES.glob("*.yaml"))}


def resolve_recipe_path(spec: str | Path) -> Path:
    """A file path, or the name of a built-in recipe."""
    path = Path(spec)
    if path.is_file():
        return path
    builtins = builtin_recipes()
    if str(spec) in builtins:
        return builtins[str(spec)]
    if path.exists():
        raise RecipeError(f"recipe '{spec}' is a directory; pass a .yaml file")
    names = ", ".join(builtins) or "none"
    raise RecipeError(f"recipe '{spec}' not found; pass a .yaml file or a built-in recipe ({names})")


def load_recipe(spec: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe. Raises RecipeError with one line per problem."""
    path = resolve_recipe_path(spec)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}: malformed YAML{where}: {problem}; fix the syntax there") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a UTF-8 text file; a recipe is YAML text") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping of sections (model, data, train, ...), got {type(raw).__name__}")
    for item in overrides or []:
        apply_override(raw, item)
    return validate_recipe(raw, source=str(path))


def apply_override(raw: dict, item: str) -> None:
    """Apply one ``key.path=value`` override in place; the value is parsed as YAML (so 3 is an int)."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"override '{item}' is not key.path=value; for example train.lr=1e-4")
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise RecipeError(f"override '{item}': '{where}' is a value, not a section")
        node = child
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    node[parts[-1]] = parsed


def validate_recipe(raw: dict, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        lines = [_describe(err) for err in e.errors()]
        raise RecipeError(f"{source}: " + "; ".join(lines)) from None


def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "recipe"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent, key = err["loc"][:-1], str(err["loc"][-1])
        known = _fields_at(parent)
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean '{'.'.join([*map(str, parent), close[0]])}'?" if close else f"known keys: {', '.join(known)}"
        return f"unknown key '{loc}'; {hint}"
    if kind == "missing":
        return f"{loc} is required; add it to the recipe"
    got = err.get("input")
    shown = repr(got) if not isinstance(got, dict) else "a mapping"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}; got {shown}"


def _fields_at(loc: tuple) -> list[str]:
    model: Any = Recipe
    for part in loc:
        field = getattr(model, "model_fields", {}).get(str(part))
        if field is None:
            return []
        ann = field.annotation
        args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = args[0] if args else ann
    return list(getattr(model, "model_fields", {}))
