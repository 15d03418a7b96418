"""train.parallel in the recipe, `--ray [ADDRESS]` on the command line, and the sharded engine's small parts (fast)."""

import pytest

from keel.errors import RecipeError
from keel.recipe import validate_recipe

BASE = {"name": "p", "model": {"name": "tiny-bert"}, "data": {"name": "tiny-sentiment"}}


def recipe(**train):
    return validate_recipe({**BASE, "train": train})


def test_parallel_takes_a_bare_name_or_a_section():
    assert recipe().train.parallel.strategy == "ddp"
    assert recipe(parallel="fsdp").train.parallel.strategy == "fsdp"
    fsdp = recipe(parallel={"strategy": "fsdp", "reshard_after_forward": False, "param_dtype": "bfloat16"})
    assert not fsdp.train.parallel.reshard_after_forward and fsdp.train.parallel.param_dtype == "bfloat16"


@pytest.mark.parametrize(
    "train, needle",
    [
        ({"parallel": "zero3"}, "train.parallel.strategy"),
        ({"parallel": {"cpu_offload": True}}, "train.parallel.strategy=fsdp"),
        ({"parallel": {"reduce_dtype": "bfloat16"}}, "applies to sharded training"),
        ({"parallel": "fsdp", "privacy": {}}, "set train.parallel=ddp"),
        ({"parallel": {"ray": {"workers": 0}}}, "train.parallel.ray.workers"),
    ],
)
def test_parallel_settings_that_cannot_work_are_refused(train, needle):
    with pytest.raises(RecipeError) as e:
        recipe(**train)
    assert needle in str(e.value)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train", "r.yaml", "--ray"], ["train", "r.yaml", "--ray", "local"]),
        (["train", "r.yaml", "--ray", "--resume"], ["train", "r.yaml", "--ray", "local", "--resume"]),
        (["train", "r.yaml", "--ray", "train.lr=1e-3"], ["train", "r.yaml", "--ray", "local", "train.lr=1e-3"]),
        (["train", "--ray", "r.yaml"], ["train", "--ray", "local", "r.yaml"]),
        (["train", "r.yaml", "--ray", "head:6379"], ["train", "r.yaml", "--ray", "head:6379"]),
        (["train", "r.yaml"], ["train", "r.yaml"]),
        (["--debug", "train", "r.yaml", "--ray"], ["--debug", "train", "r.yaml", "--ray", "local"]),
        (["serve", "runs/x", "--ray"], ["serve", "runs/x", "--ray"]),  # a flag there: nothing is added
        (["serve", "runs/x", "--ray", "--port", "0"], ["serve", "runs/x", "--ray", "--port", "0"]),
    ],
)
def test_ray_address_is_optional(args, expected):
    from keel.cli._app import optional_ray_address

    assert optional_ray_address(args) == expected


@pytest.mark.parametrize(
    "position, saved, now, expected",
    [
        (4, 2, 1, 8),  # 4 x 8 x 2 = 64 examples seen: micro-batch 8 of one process starts there
        (4, 2, 2, 4),  # as many processes: unchanged
        (4, 2, 3, 3),  # 64 seen, 24 per step of 3: rounded up to 72
        (0, 2, 3, 0),
    ],
)
def test_the_epoch_position_is_rescaled_to_another_number_of_processes(position, saved, now, expected):
    from keel.train.sharded import rescale_position

    assert rescale_position(position, 8, saved, now) == expected


def test_the_blocks_sharded_one_by_one_are_the_longest_list_of_one_block_class():
    import torch

    from keel.train.sharded import blocks

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.ReLU()])  # mixed: not blocks
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])
            self.pair = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])

    model = Model()
    assert blocks(model) == list(model.layers)
    assert blocks(torch.nn.Linear(2, 2)) == []
