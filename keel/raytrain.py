"""`keel train RECIPE --ray [ADDRESS]`: the same training, in Ray Train workers (``ray.train.torch.TorchTrainer``).

The driver (this process) checks the recipe, picks the run directory, joins the Ray cluster at ADDRESS (or
starts a local one) and hands the recipe to ``train.parallel.ray.workers`` workers. Each worker runs exactly
what one process of ``torchrun ... keel train`` runs (keel.pipeline.train_run): Ray sets up the process group
(gloo on CPU, NCCL on GPUs) and the RANK / WORLD_SIZE variables accelerate reads, so the engine, DDP or FSDP
(``train.parallel.strategy``) and keel's checkpoints are the ones of any other launch.

Each keel checkpoint (keel's own format, sealed by its manifest) is reported to Ray as it is written; when a
worker dies, Ray (``FailureConfig(max_failures)``) restarts the group and the workers resume from the last
checkpoint (copied back from Ray's storage if the run directory lacks it), so the run ends with the model an
uninterrupted run would have given. The working directory, the data and keel's cache must be at the same paths
on every node (a shared filesystem); keel must be installed on every node.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from keel.errors import KeelError

logger = logging.getLogger(__name__)

# What a worker needs from the driver's environment (offline hub, keel's cache, thread counts)
PASSED_ENV = (
    "KEEL_CACHE_DIR",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "PYTHONPATH",
)


def train_on_ray(recipe, address: str | None, resume: bool = False) -> Path:
    """Train ``recipe`` in Ray Train workers; returns the run directory. ``address``: None starts a local cluster."""
    from keel import rundir
    from keel.io import atomic_write_text
    from keel.pipeline import check_recipe, trainer_kind

    if trainer_kind(recipe) not in ("engine", "pretrain"):
        raise KeelError(
            f"--ray runs keel's training engine; {trainer_kind(recipe)} recipes train with their own loop "
            "(remove --ray, or launch it with torchrun)"
        )
    check_recipe(recipe)
    try:
        import ray
        from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # noqa: F401
        from ray.train.torch import TorchTrainer
    except ImportError as e:
        raise KeelError(f"--ray needs Ray Train ({e}); install it with pip install 'ray[train]'") from None
    cfg = recipe.train.parallel.ray
    run_dir = rundir.resolve(recipe, resume).resolve()
    if not resume and not recipe.output.dir:  # `keel train --resume` (with or without --ray) continues this run
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir.parent / f".{recipe.name}.latest", run_dir.name + "\n")
    storage = Path(cfg.storage).resolve() if cfg.storage else run_dir.parent / ".ray"
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    try:
        ray.init(address=address, runtime_env={"env_vars": env}, logging_level=logging.WARNING, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()
        raise KeelError(
            f"cannot reach a Ray cluster at {address or 'a new local cluster'}: {first[0] if first else e}; "
            "start one with `ray start --head`, or pass its address (--ray HOST:6379)"
        ) from None
    logger.info(
        f"Ray Train: {cfg.workers} workers ({cfg.cpus_per_worker} CPU{', 1 GPU' if cfg.use_gpu else ''} each), "
        f"up to {cfg.max_failures} restarts; run directory {run_dir}"
    )
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "recipe": recipe.model_copy(
                update={"output": recipe.output.model_copy(update={"dir": str(run_dir)})}
            ).model_dump(mode="json"),
            "cwd": os.getcwd(),
            "resume": resume,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=f"{recipe.name}-{run_dir.name}",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=recipe.train.keep_last_k),
        ),
    )
    try:
        trainer.fit()
    except Exception as e:  # Ray raises its TrainingFailedError once max_failures restarts are spent
        first = next((ln for ln in str(e).strip().splitlines() if ln.strip()), type(e).__name__)
        raise KeelError(
            f"training on Ray failed after {cfg.max_failures} restart(s): {first[:300]}; "
            f"see {run_dir / 'run.json'}, or resume with --ray --resume"
        ) from None
    finally:
        ray.shutdown()
    return run_dir


def _worker(config: dict) -> None:
    """One Ray Train worker: one process of the run, as under torchrun."""
    import ray.train

    from keel.pipeline import train_run
    from keel.progress import setup_logging
    from keel.recipe import validate_recipe
    from keel.train import engine

    setup_logging()
    os.chdir(config["cwd"])
    recipe = validate_recipe(config["recipe"])
    run_dir = Path(recipe.output.dir)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    restored = ray.train.get_checkpoint()
    if restored is not None and rank == 0:
        _restore(restored, run_dir / "checkpoints")
    # a restart after a failure continues the run the first attempt started (or starts it afresh when that
    # attempt died before its first checkpoint: the engine says so)
    resume = config["resume"] or (run_dir / "run.json").is_file()

    def report(path: Path) -> None:
        from ray.train import Checkpoint

        step = int(path.name.split("-")[1])
        checkpoint = Checkpoint.from_directory(str(path)) if rank == 0 else None
        ray.train.report({"step": step}, checkpoint=checkpoint, checkpoint_dir_name=path.name)

    engine.CHECKPOINT_LISTENERS.append(report)
    try:
        train_run(recipe, resume=resume)
    finally:
        engine.CHECKPOINT_LISTENERS.remove(report)


def _restore(checkpoint, root: Path) -> None:
    """Copy the last checkpoint Ray holds into the run directory when it is not there (another node's disk)."""
    from keel.io import verify_manifest

    with checkpoint.as_directory() as src:
        src = Path(src)
        target = root / src.name
        if (target / "manifest.json").is_file():
            return
        verify_manifest(src)
        tmp = root / f".tmp-{src.name}-ray"
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, tmp)
        os.replace(tmp, target)
        logger.info(f"restored {src.name} from Ray's storage")
