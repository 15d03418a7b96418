"""`keel serve --ray`: the serve verb's Ray Serve path (the flag itself is on `keel serve`, keel/cli/serve.py)."""

from __future__ import annotations

from keel.errors import KeelError


def serve_on_ray(
    target: str,
    config,
    api_key_file: str | None,
    allow_no_auth: bool,
    ssl_certfile: str | None,
    device: str | None,
    address: str | None = None,
) -> None:
    """``address``: --ray-address (None: $RAY_ADDRESS, else a local cluster), checked before Ray is imported."""
    if ssl_certfile:
        raise KeelError(
            "keel serve --ray does not terminate TLS (Ray Serve's proxy speaks plain HTTP); put TLS in front "
            "of it (an ingress or load balancer), or serve without --ray"
        )
    from keel.serve.ray_serve import ray_address, serve_ray

    serve_ray(target, config, api_key_file, allow_no_auth, device, ray_address(address))
