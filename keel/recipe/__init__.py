"""Recipes: one YAML file, typed and validated, drives a whole run.

A recipe is data, not code: pydantic models with ``extra="forbid"``, read with ``yaml.safe_load``,
and ``key.path=value`` overrides from the command line that go through the same validation.
This module imports no torch, so ``keel validate`` stays fast.

The sections live beside this file, one module per area (data, train, compress, trust, serve, generative,
federated); this module assembles the whole Recipe and loads, overrides and validates it.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from keel.errors import RecipeError
from keel.recipe.base import Strict
from keel.recipe.compress import BudgetConfig, CompressConfig, DistillConfig, PruneConfig, QuantizeConfig
from keel.recipe.data import Columns, DataConfig, ModelConfig, SplitConfig
from keel.recipe.federated import FederatedConfig
from keel.recipe.fewshot import FewshotConfig
from keel.recipe.generative import AlignConfig, LoraConfig, PretrainConfig, SFTConfig
from keel.recipe.serve import OutputConfig, ServeConfig
from keel.recipe.train import EarlyStopping, PrivacyConfig, TrainConfig
from keel.recipe.trust import AuditConfig, ExplainConfig, FairnessConfig, FairnessGates

# the sections are re-exported: `from keel.recipe import DataConfig` is how the rest of keel names them
__all__ = [
    "AlignConfig",
    "AuditConfig",
    "BUILTIN_RECIPES",
    "BudgetConfig",
    "Columns",
    "CompressConfig",
    "DataConfig",
    "DistillConfig",
    "EarlyStopping",
    "ExplainConfig",
    "FairnessConfig",
    "FairnessGates",
    "FederatedConfig",
    "LoraConfig",
    "MODEL_FIELDS",
    "ModelConfig",
    "OutputConfig",
    "PATH_FIELDS",
    "PretrainConfig",
    "PrivacyConfig",
    "PruneConfig",
    "QuantizeConfig",
    "Recipe",
    "SFTConfig",
    "ServeConfig",
    "SplitConfig",
    "Strict",
    "TrainConfig",
    "apply_override",
    "builtin_recipes",
    "load_recipe",
    "recipe_hash",
    "resolve_paths",
    "resolve_recipe_path",
    "validate_recipe",
    "validate_serve",
]

BUILTIN_RECIPES = Path(__file__).parent.parent / "recipes"


class Recipe(Strict):
    """A whole run."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="names the run directory runs/<name>")
    task: Literal["classification", "causal-lm"] = Field("classification", description="label texts, or model language")
    model: ModelConfig = ModelConfig()
    data: DataConfig
    train: TrainConfig = TrainConfig()
    compress: CompressConfig | None = Field(None, description="compression after training; null = none")
    output: OutputConfig = OutputConfig()
    serve: ServeConfig = ServeConfig()
    pretrain: PretrainConfig = PretrainConfig()
    sft: SFTConfig | None = Field(None, description="supervised fine-tuning on chats (causal-lm)")
    align: AlignConfig | None = Field(None, description="alignment from preferences (causal-lm)")
    federated: FederatedConfig | None = Field(None, description="federated learning across sites (keel federate)")
    audit: AuditConfig | None = Field(None, description="explanations, fairness audit and gates")
    fewshot: FewshotConfig | None = Field(None, description="new labels from a few examples each (keel fewshot)")

    @model_validator(mode="after")
    def _metric_fits_task(self) -> Recipe:
        if self.task == "causal-lm" and self.train.metric in ("accuracy", "macro_f1"):
            raise ValueError(
                f"train.metric '{self.train.metric}' is for classification; use train.metric=loss for causal-lm"
            )
        if (self.model.init == "scratch" or self.sft or self.align) and self.task != "causal-lm":
            raise ValueError("model.init: scratch, sft and align are for causal language models; set task: causal-lm")
        if self.sft and self.align:
            raise ValueError("a recipe has either an sft or an align section, not both; run them as two recipes")
        if self.federated is not None and self.task != "classification":
            raise ValueError(
                f"keel federate trains classifiers; remove the federated: section from this {self.task} "
                "recipe, or set task: classification"
            )
        self._compress_fits()
        self._audit_fits()
        return self

    def _compress_fits(self) -> None:
        c = self.compress
        if c is not None and self.train.privacy is not None and (c.distill is not None or c.prune is not None):
            raise ValueError(
                "training stages after a differentially private run would spend privacy outside its "
                "accountant; compress a DP model by quantization only (unset compress.distill/prune)"
            )

    def _audit_fits(self) -> None:
        a = self.audit
        if a is None or self.task != "classification":  # causal LMs are not audited by keel audit
            return
        if a.explain is not None and self.data.split.test == 0:
            raise ValueError("audit.explain needs test examples; set data.split.test above 0")
        f = a.fairness
        if f is not None and getattr(self.data.split, f.split) == 0:
            raise ValueError(f"audit.fairness needs a non-empty {f.split} split; set data.split.{f.split} above 0")
        if (
            f is not None
            and f.positive_label is not None
            and self.data.labels is not None
            and f.positive_label not in map(str, self.data.labels)
        ):
            raise ValueError(
                f"audit.fairness.positive_label '{f.positive_label}' is not in data.labels "
                f"({', '.join(map(str, self.data.labels))}); pick one of them"
            )

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


# Recipe fields that name a file or folder. A relative path in a recipe file is relative to that file's folder (as in
# compose files), so a recipe beside its data runs from anywhere; one given as a key.path=value override, or in a
# built-in recipe, is relative to the working directory. Every one is made absolute before validation, so the run's
# recipe.yaml stands alone.
PATH_FIELDS = (
    "data.path",
    "data.weak.unlabeled",
    "data.weak.functions",
    "output.dir",
    "audit.fairness.baseline_run",
    "federated.server.root_certificate",
    "federated.server.certificate",
    "federated.server.private_key",
    "fewshot.output_dir",
    "train.parallel.ray.storage",
)
# A registry name or a local model folder: taken as a folder when a Hugging Face folder (config.json) is there.
MODEL_FIELDS = ("model.name", "compress.distill.student")
NAME_OR_PY = ("data.weak.functions",)  # a built-in name, or a .py file (made absolute only then)


def resolve_paths(raw: dict, base: Path) -> None:
    """Make the relative paths of a raw recipe absolute against ``base``, in place; absolute ones are kept."""
    for dotted in PATH_FIELDS + MODEL_FIELDS:
        *parents, leaf = dotted.split(".")
        node: Any = raw
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        value = node.get(leaf) if isinstance(node, dict) else None
        if not isinstance(value, str) or not value.strip():
            continue
        if dotted in NAME_OR_PY and not value.endswith(".py"):
            continue
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = base / path
        if dotted in MODEL_FIELDS and not (path / "config.json").is_file():
            continue  # a registry name (or a folder that is not there: resolve_model says so)
        node[leaf] = os.path.abspath(path)


def load_recipe(spec: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe. Raises RecipeError with one line per problem.

    Relative paths in the file are relative to the file's folder; those in overrides (and in built-in recipes) to
    the working directory (see PATH_FIELDS)."""
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
        raise RecipeError(
            f"{path}: a recipe is a YAML mapping of sections (model, data, train, ...), got {type(raw).__name__}"
        )
    if path.resolve().parent != BUILTIN_RECIPES.resolve():
        resolve_paths(raw, path.resolve().parent)
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
    """A raw recipe (its relative paths taken against the working directory) -> a Recipe, or one RecipeError line."""
    raw = copy.deepcopy(raw)
    resolve_paths(raw, Path.cwd())
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        lines = [_describe(err) for err in e.errors()]
        raise RecipeError(f"{source}: " + "; ".join(lines)) from None


def validate_serve(raw: dict, source: str = "serve options") -> ServeConfig:
    """The serve: section alone (`keel serve` options), checked and reported as in a recipe."""
    try:
        return ServeConfig.model_validate(raw)
    except ValidationError as e:
        lines = [_describe({**err, "loc": ("serve", *err["loc"])}) for err in e.errors()]
        raise RecipeError(f"{source}: " + "; ".join(lines)) from None


def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "recipe"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent, key = err["loc"][:-1], str(err["loc"][-1])
        known = _fields_at(parent)
        close = difflib.get_close_matches(key, known, n=1)
        hint = (
            f"did you mean '{'.'.join([*map(str, parent), close[0]])}'?" if close else f"known keys: {', '.join(known)}"
        )
        return f"unknown key '{loc}'; {hint}"
    if kind == "missing":
        return f"{loc} is required; add it to the recipe"
    got = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if isinstance(got, dict) else f"{loc}: {msg}; got {got!r}"


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
