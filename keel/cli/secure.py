"""Secure artifacts: encryption at rest and signatures (keel/secure)."""

from __future__ import annotations

import typer

from keel.cli._app import app
from keel.errors import KeelError


@app.command()
def seal(
    run_dir: str = typer.Argument(None, help="a run directory (its model/ and export/ folders are sealed)"),
    key_file: str | None = typer.Option(None, help="file with the 32-byte key (or set KEEL_SEAL_KEY)"),
    new_key_file: str | None = typer.Option(
        None, help="rotate: re-seal a sealed run under this key (or KEEL_SEAL_NEW_KEY); the current one opens it"
    ),
    new_key: bool = typer.Option(False, "--new-key", help="print a fresh random key and exit"),
) -> None:
    """Encrypt a run's model and exports at rest (AES-256-GCM, chunked); serve/eval/predict open it with the key."""
    import time
    from pathlib import Path

    from keel.io import run_lock
    from keel.secure import seal as sealing

    if new_key:
        print(sealing.new_key())
        return
    if not run_dir:
        raise KeelError("keel seal: pass a run directory (or --new-key to print a fresh key)")
    if not Path(run_dir).is_dir():
        raise KeelError(f"run directory '{run_dir}' not found; pass the folder `keel run` printed (see runs/)")
    key = sealing.load_key(key_file)
    rotate = sealing.load_key(new_key_file, sealing.NEW_KEY_ENV, sealing.NEW_KEY_FILE_ENV, required=False)
    start = time.perf_counter()
    with run_lock(Path(run_dir)):
        done = sealing.seal_run(Path(run_dir), rotate or key, key if rotate else None)
    seconds = time.perf_counter() - start
    total = sum(d["bytes"] for d in done)
    print(
        f"{'re-sealed' if rotate else 'sealed'} {len(done)} folder(s), {total / 1e6:.1f} MB in {seconds:.1f} s "
        f"({total / 1e6 / max(seconds, 1e-9):.0f} MB/s): {', '.join(Path(d['folder']).name for d in done)}"
    )
    left = [p.name for p in (Path(run_dir) / "checkpoints", Path(run_dir) / "compress") if p.is_dir()]
    if left:
        print(f"note: not sealed, still plaintext weights: {', '.join(left)}/; delete them before shipping this run")


@app.command()
def unseal(
    run_dir: str = typer.Argument(..., help="a sealed run directory"),
    key_file: str | None = typer.Option(None, help="file with the 32-byte key (or set KEEL_SEAL_KEY)"),
) -> None:
    """Decrypt a sealed run's model and exports back to plain files."""
    from pathlib import Path

    from keel.io import run_lock
    from keel.secure import seal as sealing

    if not Path(run_dir).is_dir():
        raise KeelError(f"run directory '{run_dir}' not found; pass the folder `keel run` printed (see runs/)")
    key = sealing.load_key(key_file)
    with run_lock(Path(run_dir)):
        done = sealing.unseal_run(Path(run_dir), key)
    print(f"unsealed {len(done)} folder(s): {', '.join(Path(d['folder']).name for d in done)}")


@app.command()
def sign(
    run_dir: str = typer.Argument(..., help="a run directory"),
    key: str = typer.Option(..., "--key", help="EC private key (PEM) to sign with"),
) -> None:
    """Sign the run's model folders (OpenSSF model-signing bundles in RUN/signatures/, key-based, offline)."""
    from pathlib import Path

    from keel.secure.sign import sign_run

    if not Path(run_dir).is_dir():
        raise KeelError(f"run directory '{run_dir}' not found; pass the folder `keel run` printed (see runs/)")
    for sig in sign_run(run_dir, key):
        print(f"signed: {sig}")


@app.command()
def verify(
    run_dir: str = typer.Argument(..., help="a run directory"),
    key: str | None = typer.Option(None, "--key", help="EC public key (PEM): also check the signatures"),
) -> None:
    """Check a run: its model files against their manifests, the signatures (with --key) and the model card."""
    from pathlib import Path

    from keel.io import verify_manifest
    from keel.secure.seal import sealed_folders

    if not Path(run_dir).is_dir():
        raise KeelError(f"run directory '{run_dir}' not found; pass the folder `keel run` printed (see runs/)")
    folders = sealed_folders(Path(run_dir))
    if not folders:
        raise KeelError(f"{run_dir} has no model to verify (model/ with a manifest); train it first")
    for folder in folders:
        verify_manifest(folder)
    print(f"manifests: {len(folders)} folder(s) match")
    from keel.secure.sbom import check_card

    claims = check_card(Path(run_dir))
    print(f"model card: {claims} claim(s) match the files" if claims else "model card: no provenance claims to check")
    if key:
        from keel.secure.sign import verify_run

        verify_run(run_dir, key, folders)
        print(f"signatures: {len(folders)} folder(s) match {key}")
