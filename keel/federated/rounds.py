"""Round checkpoints: federated/round-XXXXX/ (the global model, the server's state and its optimizer moments),
written atomically after each round; `--resume` continues after the last complete one."""

from __future__ import annotations

import json
from pathlib import Path

from keel.errors import CheckpointError
from keel.io import atomic_dir, verify_manifest


def save_round(root: Path, r: int, specs, arrays, state: dict, keep: int, moments: dict | None = None) -> None:
    """Round ``r``'s global weights, JSON state and the server optimiser's moments (FedAdam), sealed together."""
    import numpy as np
    from safetensors.numpy import save_file

    with atomic_dir(root / f"round-{r:05d}") as tmp:
        save_file(
            {name: np.ascontiguousarray(a) for (name, _, _), a in zip(specs, arrays)}, str(tmp / "weights.safetensors")
        )
        if moments:
            save_file({k: np.ascontiguousarray(a) for k, a in moments.items()}, str(tmp / "server_moments.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"round": r, **state}, indent=2))
    for old in sorted(root.glob("round-*"))[:-keep]:
        import shutil

        shutil.rmtree(old, ignore_errors=True)


def load_round(root: Path, specs) -> tuple[list, dict] | None:
    """The last complete round checkpoint: (arrays, state), or None. Every file is checked against its manifest."""
    from safetensors.numpy import load_file

    done = sorted(p for p in root.glob("round-*") if (p / "manifest.json").is_file())
    if not done:
        return None
    verify_manifest(done[-1])
    tensors = load_file(str(done[-1] / "weights.safetensors"))
    names = [n for n, _, _ in specs]
    if sorted(tensors) != sorted(names):
        raise CheckpointError(
            f"{done[-1]} holds weights of another model (model.name changed?); resume with the "
            f"original recipe or start a new run"
        )
    arrays = [tensors[n] for n in names]
    for (n, shape, _), a in zip(specs, arrays):
        if tuple(a.shape) != shape:
            raise CheckpointError(
                f"{done[-1]}: {n} has shape {tuple(a.shape)}, the model needs {shape}; "
                f"resume with the original model settings"
            )
    state = json.loads((done[-1] / "state.json").read_text())
    if (done[-1] / "server_moments.safetensors").is_file():
        state["server_moments"] = load_file(str(done[-1] / "server_moments.safetensors"))
    return arrays, state


SERVER_STATE = ("m_t", "v_t", "current_weights")  # FedOpt's moments and its float64 copy of the global model


def server_moments(strategy) -> dict:
    """A FedOpt strategy's (FedAdam's) optimiser state as named arrays; {} for strategies without one."""
    inner = getattr(strategy, "strategy", strategy)  # under Flower's central-DP wrapper
    if getattr(inner, "m_t", None) is None:
        return {}
    return {f"{name}.{i}": a for name in SERVER_STATE for i, a in enumerate(getattr(inner, name, None) or [])}


def restore_moments(strategy, moments: dict) -> None:
    inner = getattr(strategy, "strategy", strategy)
    for name in SERVER_STATE:
        keys = sorted((k for k in moments if k.startswith(name + ".")), key=lambda k: int(k.rsplit(".", 1)[1]))
        if keys:
            setattr(inner, name, [moments[k] for k in keys])


# -- the server side ----------------------------------------------------------------------------------
