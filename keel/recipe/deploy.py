"""Recipe section for serving beyond one process: serve.ray.* (`keel serve --ray`, Ray Serve)."""

from __future__ import annotations

from pydantic import Field, model_validator

from keel.recipe.base import Strict


class RayServeConfig(Strict):
    """`keel serve --ray`: how many replicas, when to add one, how Ray checks them. min == max: a fixed count."""

    min_replicas: int = Field(1, ge=1, le=1024, description="replicas kept running (and started with)")
    max_replicas: int = Field(1, ge=1, le=1024, description="the autoscaler's ceiling; > min_replicas turns it on")
    target_ongoing_requests: float = Field(
        16.0, gt=0.0, description="autoscaling: ongoing requests per replica it aims for (more: add a replica)"
    )
    max_ongoing_requests: int = Field(
        128, ge=1, description="requests one replica takes at once (keel batches them); more wait in Ray's proxy"
    )
    upscale_delay_s: float = Field(10.0, ge=0.0, description="autoscaling: load held this long before adding")
    downscale_delay_s: float = Field(300.0, ge=0.0, description="autoscaling: quiet this long before removing")
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs Ray reserves per replica")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs Ray reserves per replica (a fraction shares one)")
    health_check_period_s: float = Field(
        5.0, gt=0.0, description="how often Ray asks each replica keel's readiness (a failing one is replaced)"
    )
    health_check_timeout_s: float = Field(10.0, gt=0.0, description="a health check slower than this fails")

    @model_validator(mode="after")
    def _replicas(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"serve.ray.min_replicas ({self.min_replicas}) is over serve.ray.max_replicas "
                f"({self.max_replicas}); set max_replicas >= min_replicas (equal: a fixed count)"
            )
        return self
