"""Sharded data parallelism (FSDP2) and its checkpoints, which resume on another number of processes.

``train.parallel: fsdp`` shards each transformer block, then the rest of the model, with
``torch.distributed.fsdp.fully_shard``: every process holds 1/N of the weights, gradients and optimiser
state, and gathers a block's weights only while it runs. The loop stays the engine's (keel/train/engine.py);
only the model's wrapping, the step's gradient sync and the checkpoint format differ.

One sharded checkpoint is a folder ``checkpoints/step-00000042/``:

    model/shard-0000R-model-00001-of-00001.safetensors      each process's shards of the weights, with their
    optimizer/shard-0000R-model-00001-of-00001.safetensors  offsets in the header (DCP's safetensors writer)
    state.json, recipe.yaml, rng-rank<R>.safetensors        as in keel/train/checkpoint.py
    manifest.json                                           SHA-256 of every file, written last

Any number of processes reads it: torch.distributed.checkpoint cuts each saved chunk to the shards the
loading processes hold (one process without a process group loads whole tensors into a plain model).
Resumed with as many processes, the run replays the same steps (RNG of each process restored). With another
number, it continues from the same place in the epoch's data order, rounded up to a whole step of the new
global batch; dropout RNG starts again from the seed, and the learning-rate schedule is stretched to the new
number of steps per epoch. No pickle: weights and optimiser tensors are safetensors, the rest JSON.

Limits (written down, not hidden): each process builds the whole model before it is sharded (no meta-device
initialisation), and the best and final models are gathered whole on the main process to be written.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from keel.errors import CheckpointError, KeelError
from keel.io import atomic_dir
from keel.train import checkpoint
from keel.train.checkpoint import Loaded, TrainState, step_dir

logger = logging.getLogger(__name__)

FORMAT = "keel-checkpoint-sharded/1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def uses_fsdp(recipe) -> bool:
    return recipe.train.parallel.strategy == "fsdp"


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def blocks(model) -> list:
    """The repeated blocks to shard one by one: the children of the longest ModuleList of one block class
    (BERT's encoder.layer, Llama's model.layers); empty when the model has none."""
    best: list = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(best):
            kinds = {type(child) for child in module}
            if len(kinds) == 1:
                best = list(module)
    return best


def shard(model, parallel, device):
    """``model`` sharded over every process of the default process group (FSDP2), as ``parallel`` says."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if device.type != "cuda" and parallel.cpu_offload:
        raise KeelError(
            "train.parallel.cpu_offload moves GPU shards to the CPU; on CPU set train.parallel.cpu_offload=false"
        )
    if device.type != "cuda" and parallel.param_dtype == "float16":
        raise KeelError("train.parallel.param_dtype float16 needs a CUDA GPU; use bfloat16 or float32 on CPU")
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    options = {
        "mesh": mesh,
        "reshard_after_forward": parallel.reshard_after_forward,
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=DTYPES[parallel.param_dtype], reduce_dtype=DTYPES[parallel.reduce_dtype]
        ),
    }
    if parallel.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    else:
        model.to(device)
    for block in blocks(model):
        fully_shard(block, **options)
    fully_shard(model, **options)  # embeddings, heads and norms outside the blocks; the root keeps them gathered last
    return model


def _unique_keys(model) -> set[str]:
    """State-dict keys without tied aliases (lm_head.weight when it is the embedding): safetensors refuses shared
    memory, and the alias is restored by the model's own tying when the embedding is loaded."""
    own = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return own & set(model.state_dict())  # non-persistent buffers (position ids) are not state


def full_state_dict(model) -> dict:
    """The whole model's weights on CPU in the main process ({} in the others); every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    keep = _unique_keys(model)
    return {k: v for k, v in full.items() if k in keep}


def load_full_state_dict(model, weights: dict) -> None:
    """Load whole weights (the same on every process) into the sharded model; tied aliases may be absent."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    missing = _unique_keys(model) - set(weights)
    if missing:
        raise CheckpointError(f"the weights lack {sorted(missing)[0]} (and {len(missing) - 1} more)")
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))


def _sharded_state(model, optimizer) -> tuple[dict, dict, dict]:
    """(model tensors, optimiser tensors by "<param name>.<state>", optimiser JSON), each process's own shards."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    keep = _unique_keys(model)
    model_sd = {k: v for k, v in model_sd.items() if k in keep}
    tensors, scalars = {}, {}
    for name, pstate in optim_sd["state"].items():
        for key, value in pstate.items():
            (tensors if torch.is_tensor(value) else scalars)[f"{name}.{key}"] = value
    return model_sd, tensors, {"param_groups": optim_sd["param_groups"], "scalars": scalars}


def _broadcast(value, main: bool):
    if not torch.distributed.is_initialized():
        return value
    box = [value if main else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def save_checkpoint(root, model, optimizer, scheduler, state: TrainState, recipe_yaml, recipe_sha256, rank_rng, main):
    """Write one sharded checkpoint atomically; every process must call it (each writes its own shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    model_sd, optim_tensors, optim_meta = _sharded_state(model, optimizer)
    final = step_dir(root, state.step)
    with atomic_dir(final) if main else nullcontext() as tmp:
        folder = Path(_broadcast(str(tmp) if main else None, main))  # the main process's temporary folder
        for name, tensors in (("model", model_sd), ("optimizer", optim_tensors)):
            dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder / name), save_distributed=True))
        if main:
            rng_meta = []
            for rank, (tensors, meta) in enumerate(rank_rng):
                save_file(tensors, str(folder / f"rng-rank{rank}.safetensors"))
                rng_meta.append(meta)
            doc = {
                "format": FORMAT,
                "state": asdict(state),
                "optimizer": optim_meta,
                "scheduler": scheduler.state_dict(),
                "rng": rng_meta,
                "recipe_sha256": recipe_sha256,
                "world_size": len(rank_rng),
            }
            (folder / "state.json").write_text(json.dumps(doc))
            (folder / "recipe.yaml").write_text(recipe_yaml)
    return final


def load_checkpoint(path: Path, model, optimizer, recipe, rank: int, world_size: int) -> Loaded:
    """Load a sharded checkpoint into ``model`` and ``optimizer`` in place, on any number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    doc = json.loads((path / "state.json").read_text())
    if doc.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a sharded checkpoint (train.parallel=fsdp) but {doc.get('format')}; "
            "resume it with train.parallel=ddp"
        )
    model_sd, optim_tensors, _ = _sharded_state(model, optimizer)  # shapes to fill (optimiser state initialised)
    try:
        dcp.load(model_sd, storage_reader=HuggingFaceStorageReader(str(path / "model")))
        dcp.load(optim_tensors, storage_reader=HuggingFaceStorageReader(str(path / "optimizer")))
    except Exception as e:  # DCP wraps each process's error; the first line names the tensor that did not fit
        detail = str(e).strip().splitlines()
        raise CheckpointError(
            f"{path}: the weights do not fit this model ({(detail[-1] if detail else type(e).__name__)[:160]}); "
            "resume with the recipe's original model section"
        ) from None
    meta = doc["optimizer"]
    optim_state: dict = {}
    for key, value in list(optim_tensors.items()) + list(meta["scalars"].items()):
        name, _, field = key.rpartition(".")
        optim_state.setdefault(name, {})[field] = value
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_sd,
        optim_state_dict={"state": optim_state, "param_groups": meta["param_groups"]},
        options=StateDictOptions(strict=False),  # tied aliases were not saved; the shared tensor was loaded
    )
    state = TrainState(**doc["state"])
    saved_world = doc["world_size"]
    rng = None
    if saved_world == world_size:
        rng = (load_file(str(path / f"rng-rank{rank}.safetensors")), doc["rng"][rank])
    else:
        state.batch_in_epoch = rescale_position(state.batch_in_epoch, recipe.train.batch_size, saved_world, world_size)
        logger.warning(
            f"resuming a checkpoint of {saved_world} processes on {world_size}: the epoch continues after the "
            "same examples (rounded up to a whole step); dropout RNG starts again from the seed"
        )
    recipe_yaml = (path / "recipe.yaml").read_text()
    return Loaded(state, None, doc["scheduler"], rng, recipe_yaml, doc["recipe_sha256"], path, world_size=saved_world)


def rescale_position(batch_in_epoch: int, batch_size: int, saved_world: int, world_size: int) -> int:
    """Micro-batches per process already consumed, for another number of processes.

    After b micro-batches on each of w processes the epoch's order has been consumed up to position b * B * w
    (keel.train.strategies.shard_batches deals the order round-robin), whatever w is; so the new position is
    the first micro-batch that starts at or after it.
    """
    return math.ceil(batch_in_epoch * batch_size * saved_world / (batch_size * world_size))


def resume_point(root: Path, model, optimizer, recipe, rank: int, world_size: int, check=None) -> Loaded | None:
    """The newest intact sharded checkpoint, loaded; older ones are tried when a newer one is corrupt
    (keel.train.checkpoint.resume_point with this format's loader). Every process verifies the manifest it reads."""
    return checkpoint.resume_point(
        root,
        model,
        recipe,
        rank,
        world_size,
        check,
        load=lambda path: load_checkpoint(path, model, optimizer, recipe, rank, world_size),
    )
