"""``train.parallel``: how several processes share a training run (torchrun, accelerate launch, Ray Train)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from keel.recipe.base import Strict

FSDP_ONLY = ("reshard_after_forward", "cpu_offload", "param_dtype", "reduce_dtype")


class RayConfig(Strict):
    """`keel train RECIPE --ray [ADDRESS]`: Ray Train workers (keel/raytrain.py)."""

    workers: int = Field(2, ge=1, description="training processes (Ray Train workers)")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs Ray reserves for each worker")
    use_gpu: bool = Field(False, description="one GPU per worker")
    max_failures: int = Field(3, ge=0, description="restarts from the last checkpoint after a worker dies")
    storage: str | None = Field(
        None, description="where Ray keeps the reported checkpoints (shared by every node); default runs/.ray"
    )


class ParallelConfig(Strict):
    """Data parallelism over the launched processes: replicated (ddp) or sharded (fsdp, FSDP2).

    A bare name is accepted: ``train.parallel: fsdp`` is ``{strategy: fsdp}``. One process trains unsharded.
    """

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: each process holds the whole model; fsdp: each holds 1/N of weights, gradients, optimiser",
    )
    reshard_after_forward: bool = Field(
        True, description="fsdp: free a block's gathered weights after its forward (less memory, one more all-gather)"
    )
    cpu_offload: bool = Field(False, description="fsdp on GPUs: keep the shards and the optimiser step on the CPU")
    param_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="fsdp: dtype the gathered weights compute in (float16 needs a GPU)"
    )
    reduce_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="fsdp: dtype the gradients are reduce-scattered in"
    )

    ray: RayConfig = Field(RayConfig(), description="Ray Train workers, for `keel train --ray`")

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, v: Any) -> Any:
        return {"strategy": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _options_need_fsdp(self) -> ParallelConfig:
        if self.strategy == "ddp":
            for name in FSDP_ONLY:
                if getattr(self, name) != type(self).model_fields[name].default:
                    raise ValueError(
                        f"train.parallel.{name} applies to sharded training; set train.parallel.strategy=fsdp "
                        f"or remove train.parallel.{name}"
                    )
        return self
