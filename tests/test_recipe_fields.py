"""`keel init` and `keel recipe fields`: starting a recipe, and the schema as a reference, through the real CLI."""

from __future__ import annotations

import json

import pytest
from conftest import keel


def _schema_paths(model, prefix=""):
    from keel.recipe_fields import _submodel

    for name, field in model.model_fields.items():
        yield f"{prefix}{name}", field
        sub = _submodel(field.annotation)
        if sub is not None:
            yield from _schema_paths(sub, f"{prefix}{name}.")


def test_every_recipe_field_has_a_description():
    from keel.recipe import Recipe
    from keel.recipe_fields import _submodel

    missing = [
        path
        for path, field in _schema_paths(Recipe)
        if not field.description and not (_submodel(field.annotation) and _submodel(field.annotation).__doc__)
    ]
    assert not missing, f"recipe fields without a description: {missing}"


@pytest.mark.slow
def test_recipe_fields_lists_the_schema_with_types_and_defaults(tmp_path):
    from keel.recipe import Recipe

    proc = keel("recipe", "fields", "--json", cwd=tmp_path, check=True)
    rows = {r["path"]: r for r in json.loads(proc.stdout)}
    assert list(rows) == [path for path, _ in _schema_paths(Recipe)]  # every field, none invented
    assert all(r["description"] for r in rows.values())
    assert rows["train.lr"]["type"] == "float" and rows["train.lr"]["default"] == str(
        Recipe.model_fields["train"].default.lr
    )
    assert rows["train.schedule"]["type"] == '"linear" | "cosine" | "constant"'
    assert rows["train.max_steps"]["type"] == "int | null" and rows["train.max_steps"]["default"] == "null"
    assert rows["data"]["default"] == "required"
    one = json.loads(keel("recipe", "fields", "train.privacy", "--json", cwd=tmp_path, check=True).stdout)
    assert one and all(r["path"].startswith("train.privacy.") for r in one)
    table = keel("recipe", "fields", "audit.gates", cwd=tmp_path, check=True).stdout
    assert "audit.gates.min_group_accuracy" in table and "train.lr" not in table
    bad = keel("recipe", "fields", "trian", cwd=tmp_path)
    assert bad.returncode == 2 and "did you mean 'train'" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_init_writes_a_commented_copy_and_never_overwrites(tmp_path):
    from keel.recipe import builtin_recipes, load_recipe

    proc = keel("init", "tiny", cwd=tmp_path, check=True)
    path = tmp_path / "tiny.yaml"
    assert "tiny.yaml" in proc.stdout and "keel run tiny.yaml" in proc.stdout
    text = path.read_text()
    assert text.startswith("#") and "keel recipe fields" in text
    assert builtin_recipes()["tiny"].read_text() in text  # the built-in's own comments are kept
    assert load_recipe(path) == load_recipe("tiny")
    keel("validate", "tiny.yaml", cwd=tmp_path, check=True)

    path.write_text("# mine\n" + text)
    again = keel("init", "tiny", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    assert path.read_text() == "# mine\n" + text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]  # no temporary file left behind

    wrong = keel("init", "quickstar", cwd=tmp_path)
    assert wrong.returncode == 2 and "did you mean 'quickstart'" in wrong.stderr
    keel("init", cwd=tmp_path, check=True)  # default: the quickstart recipe
    assert load_recipe(tmp_path / "quickstart.yaml") == load_recipe("quickstart")
