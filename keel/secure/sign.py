"""Signed models: `keel sign RUN --key PRIVATE.pem`, `keel verify RUN --key PUBLIC.pem`, and serve.verify_key.

Signatures are OpenSSF model-signing bundles (the ``model-signing`` package: a Sigstore bundle over the SHA-256 of
every file, signed with a local elliptic-curve key; no network), one per folder keel loads a model from (model/,
export/<variant>/), written to RUN/signatures/<folder>.sig, so `model_signing verify key` checks them too. The model
card is left out of the signature (later stages rewrite it; `keel verify` checks its claims against the files).
A sealed folder is signed as it lies on disk (its ciphertext): seal first, then sign; verifying needs no seal key.
"""

from __future__ import annotations

from pathlib import Path

from keel.errors import KeelError
from keel.io import UNSEALED
from keel.secure.seal import sealed_folders

SIGNATURES = "signatures"


class SignatureError(KeelError):
    """A model that is unsigned, or whose files do not match its signature."""


def signature_path(run_dir: Path, folder: Path) -> Path:
    rel = folder.relative_to(run_dir).as_posix().replace("/", "-")
    return run_dir / SIGNATURES / f"{rel}.sig"


def _hashing(folder: Path):
    from model_signing import hashing

    return hashing.Config().set_ignored_paths(paths=[n for n in UNSEALED if (folder / n).exists()])


def _key(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise SignatureError(
            f"{what} {path} not found; pass a PEM elliptic-curve key (openssl ecparam -name "
            "prime256v1 -genkey -noout -out signing.key; openssl ec -in signing.key -pubout -out "
            "signing.pub)"
        )
    return path


def sign_run(run_dir: str | Path, private_key: str | Path, password: str | None = None) -> list[Path]:
    """Sign every model folder of the run; returns the signature files written."""
    from model_signing import signing

    from keel.io import atomic_write_bytes

    run_dir = Path(run_dir)
    folders = sealed_folders(run_dir)
    if not folders:
        raise SignatureError(f"{run_dir} has no model to sign (model/ with a manifest); train it first")
    key = _key(private_key, "private key")
    written = []
    for folder in folders:
        out = signature_path(run_dir, folder)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        try:
            signing.Config().use_elliptic_key_signer(private_key=key, password=password).set_hashing_config(
                _hashing(folder)
            ).sign(folder, tmp)
        except (ValueError, TypeError) as e:
            tmp.unlink(missing_ok=True)
            raise SignatureError(
                f"cannot sign with {key}: {str(e).splitlines()[0][:200]}; pass an unencrypted "
                "EC private key in PEM (or its password)"
            ) from None
        atomic_write_bytes(out, tmp.read_bytes())
        tmp.unlink()
        written.append(out)
    return written


def verify_run(run_dir: str | Path, public_key: str | Path, folders: list[Path] | None = None) -> list[Path]:
    """Check every model folder of the run against its signature; raises SignatureError naming the first failure."""
    from model_signing import verifying

    run_dir = Path(run_dir)
    key = _key(public_key, "public key")
    folders = folders if folders is not None else sealed_folders(run_dir)
    if not folders:
        raise SignatureError(f"{run_dir} has no model folder to verify")
    for folder in folders:
        sig = signature_path(run_dir, folder)
        if not sig.is_file():
            raise SignatureError(
                f"{folder} is not signed ({sig} is missing); sign it with `keel sign {run_dir} "
                "--key PRIVATE.pem` or serve a signed model"
            )
        try:
            verifying.Config().use_elliptic_key_verifier(public_key=key).set_hashing_config(_hashing(folder)).verify(
                folder, sig
            )
        except Exception as e:  # noqa: BLE001 (model-signing raises ValueError and others for a bad bundle)
            first = _why(str(e)) or type(e).__name__
            raise SignatureError(
                f"{folder} does not match its signature {sig}: {first}; restore the signed files or re-sign them"
            ) from None
    return folders


def _why(message: str) -> str:
    """model-signing's mismatch list, without the digests: which files are extra, missing or changed."""
    import re

    extra = re.search(r"Extra files found in model '[^']*': ([^\"\]]+)", message)
    missing = re.search(r"Missing files in model '[^']*': ([^\"\]]+)", message)
    changed = re.findall(r"Hash mismatch for '([^']+)'", message)
    parts = (
        ([f"added {extra.group(1)}"] if extra else [])
        + ([f"removed {missing.group(1)}"] if missing else [])
        + ([f"changed {', '.join(changed)}"] if changed else [])
    )
    return "; ".join(parts) if parts else message.splitlines()[0][:300] if message else ""
