"""Small file helpers shared by checkpoints, caches and run directories: hashing and atomic writes.

The rule everywhere: write into a temporary sibling, fsync, then rename into place, so a reader
(or a resumed run) never sees a half-written file or folder under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from keel.errors import CheckpointError

MANIFEST = "manifest.json"


def cache_dir() -> Path:
    """keel's own cache (tokenized data, converted models): $KEEL_CACHE_DIR or ~/.cache/keel."""
    root = os.environ.get("KEEL_CACHE_DIR") or Path.home() / ".cache" / "keel"
    return Path(root)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it is sealed with a manifest and renamed to ``final``.

    An existing ``final`` is replaced only after the new folder is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        write_manifest(tmp)
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(folder: Path, extra: dict | None = None) -> None:
    """SHA-256 and size of every file in ``folder``, fsynced, written last."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            files[p.relative_to(folder).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    atomic_write_json(folder / MANIFEST, {"format": "keel-manifest/1", "files": files, **(extra or {})})


def verify_manifest(folder: Path) -> dict:
    """Check every file against the manifest; raise CheckpointError naming the first bad one."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{folder} has no {MANIFEST}: it is incomplete (an interrupted write?); re-create it or point at another folder")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError):
        raise CheckpointError(f"{mpath} is corrupt; re-create {folder}") from None
    for name, meta in files.items():
        p = folder / name
        if not p.is_file():
            raise CheckpointError(f"{p} is missing; {folder} is incomplete: re-create it")
        if p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
            raise CheckpointError(f"checksum mismatch in {p}: the file is corrupt; restore it or re-create {folder}")
    return manifest
