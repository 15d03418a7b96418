"""Every recipe field with its type, default and description, read from the pydantic models in keel/recipe/
(so `keel recipe fields` can never drift from the schema), and `keel init`'s commented copy of a built-in recipe."""

from __future__ import annotations

import difflib
import os
import types
import typing
from pathlib import Path
from typing import Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from keel.errors import RecipeError


def _submodel(annotation) -> type[BaseModel] | None:
    """The section model a field holds (``X``, ``X | None``), or None for a plain value."""
    for a in typing.get_args(annotation) or (annotation,):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def type_name(annotation) -> str:
    """A field's type as a recipe writer reads it: ``int``, ``float | null``, ``"linear" | "cosine"``, ``list of str``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is list:
        return f"list of {type_name(args[0])}" if args else "list"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.default
    if value is PydanticUndefined and field.default_factory is not None:
        value = field.default_factory()
    if isinstance(value, BaseModel):
        return "(section)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _describe(field) -> str:
    if field.description:
        return field.description
    model = _submodel(field.annotation)
    doc = (model.__doc__ or "").strip() if model else ""
    return doc.splitlines()[0] if doc else ""


def fields(model: type[BaseModel], prefix: str = "") -> list[dict]:
    """One row per field under ``model``, depth first: path, type, default, description."""
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        sub = _submodel(field.annotation)
        rows.append(
            {
                "path": path,
                "type": type_name(field.annotation),
                "default": _default(field),
                "description": _describe(field),
                "section": sub is not None,
            }
        )
        if sub is not None:
            rows.extend(fields(sub, f"{path}."))
    return rows


def section_fields(section: str | None = None) -> list[dict]:
    """The rows of one section (``train``, ``train.privacy``), or of the whole recipe."""
    from keel.recipe import Recipe

    rows = fields(Recipe)
    if not section:
        return rows
    sections = [r["path"] for r in rows if r["section"]]
    if section not in sections:
        close = difflib.get_close_matches(section, sections, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"sections: {', '.join(s for s in sections if '.' not in s)}"
        raise RecipeError(f"'{section}' is not a recipe section; {hint}")
    return [r for r in rows if r["path"].startswith(f"{section}.")]


INIT_HEADER = """\
# A copy of keel's built-in recipe '{name}', yours to edit.
# Every field with its type, default and meaning: keel recipe fields   (one section: keel recipe fields train)
# Check it without loading a model: keel validate {file}      Run it: keel run {file}
"""


def init_recipe(name: str, folder: Path) -> Path:
    """Write FOLDER/NAME.yaml, a commented copy of the built-in recipe NAME; an existing file is never replaced."""
    from keel.recipe import builtin_recipes

    builtins = builtin_recipes()
    if name not in builtins:
        close = difflib.get_close_matches(name, list(builtins), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise RecipeError(f"'{name}' is not a built-in recipe; {hint}built-in recipes: {', '.join(builtins)}")
    target = folder / f"{name}.yaml"
    if target.exists():
        raise RecipeError(
            f"{target} already exists; keel init never overwrites a file: remove or rename it, or edit it"
        )
    text = INIT_HEADER.format(name=name, file=target.name) + builtins[name].read_text(encoding="utf-8")
    tmp = folder / f".{target.name}.tmp-{os.getpid()}"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.link(tmp, target)  # fails if the file appeared meanwhile: never replaces it, never half-written
    except FileExistsError:
        raise RecipeError(f"{target} already exists; keel init never overwrites a file: remove or rename it") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target
