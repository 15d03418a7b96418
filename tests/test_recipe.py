import subprocess
import sys

import pytest

from keel.errors import RecipeError
from keel.recipe import load_recipe, validate_recipe


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_defaults_and_overrides_are_typed(tmp_path):
    p = write(tmp_path, "data: {name: tweets-sentiment}\ntrain: {mixed_precision: no}\n")
    r = load_recipe(p, ["train.lr=1e-4", "train.epochs=5", "model.max_length=64", "data.split.seed=3"])
    assert r.train.lr == 1e-4 and r.train.epochs == 5 and r.model.max_length == 64 and r.data.split.seed == 3
    assert r.train.mixed_precision == "no"  # YAML reads a bare `no` as False
    assert r.selection_metric == "macro_f1"


def test_hash_is_stable_and_tracks_changes(tmp_path):
    p = write(tmp_path, "data: {name: tweets-sentiment}\n")
    assert load_recipe(p).sha256() == load_recipe(p).sha256()
    assert load_recipe(p).sha256() != load_recipe(p, ["train.lr=1e-3"]).sha256()


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        ("data: {name: tweets-sentiment}\ntrain: {lrr: 1}\n", [], "unknown key 'train.lrr'; did you mean 'train.lr'?"),
        ("data: {name: tweets-sentiment}\n", ["train.epochs=many"], "train.epochs"),
        ("data: {name: tweets-sentiment}\n", ["train.mixed_precision=fp8"], "train.mixed_precision"),
        ("data: {name: tweets-sentiment, path: x.csv}\n", [], "exactly one of data.name"),
        ("model: {name: minilm-l6}\n", [], "data is required"),
        ("data: {name: tweets-sentiment\n", [], "malformed YAML at line"),
        ("- a\n- b\n", [], "a recipe is a YAML mapping"),
        ("data: {name: tweets-sentiment}\n", ["train"], "is not key.path=value"),
        ("data: {name: tweets-sentiment}\n", ["train.lr=1", "train.lr.x=1"], "'train.lr' is a value"),
        ("task: causal-lm\ndata: {name: shakespeare}\ntrain: {metric: accuracy}\n", [], "use train.metric=loss"),
        (
            "data: {name: tweets-sentiment}\ntrain: {privacy: {target_epsilon: 8}}\n",
            ["train.group_by_length=true"],
            "set train.group_by_length=false",
        ),
    ],
)
def test_bad_recipes_name_the_field(tmp_path, text, overrides, expected):
    p = write(tmp_path, text)
    with pytest.raises(RecipeError) as e:
        load_recipe(p, overrides)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_validate_loads_no_model_and_no_torch(tmp_path):
    """`keel validate` must stay light: no torch, transformers or datasets import."""
    p = write(tmp_path, "data: {name: tweets-sentiment}\n")
    code = (
        "import sys\n"
        "from keel.cli import app\n"
        f"app(['validate', {str(p)!r}], standalone_mode=False)\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'pandas') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_the_quickstart_compresses_to_a_two_layer_student_distilled_for_three_epochs():
    """The demo's deployable path (benchmarks/README.md, issue 15): 2 of the teacher's 6 layers, FFN halved, the
    vocabulary trimmed, distilled for 3 epochs on 6,000 teacher-labelled tweets, then ONNX int8."""
    from keel.compress.distill import pick_layers

    c = load_recipe("quickstart").compress
    assert pick_layers(6, c.distill.layers) == [2, 5] and c.distill.epochs == 0  # cut; the pruning stage distils
    assert (c.prune.ffn, c.prune.vocab, c.prune.finetune_epochs) == (0.5, True, 3)
    assert c.distill.transfer_samples == 6000 and c.quantize.onnx_int8


def test_builtin_recipes_validate():
    from keel.recipe import builtin_recipes

    names = builtin_recipes()
    assert "quickstart" in names
    for name in names:
        validate_recipe(load_recipe(name).model_dump())
