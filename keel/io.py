"""Small file helpers shared by checkpoints, caches and run directories: hashing and atomic writes.

The rule everywhere: write into a temporary sibling, fsync, then rename into place, so a reader
(or a resumed run) never sees a half-written file or folder under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from keel.errors import CheckpointError, KeelError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# Files a stage may write into a sealed folder later; nothing ever loads them (the model card is rewritten by every
# stage that learns something new). Anything else there that the manifest does not list is refused.
UNSEALED = ("MODEL_CARD.md",)
LOCK = ".keel.lock"


class IntegrityError(CheckpointError):
    """A sealed folder whose files are not the ones it was sealed with (missing, changed, or added)."""


def cache_dir() -> Path:
    """keel's own cache (tokenized data, converted models): $KEEL_CACHE_DIR or ~/.cache/keel."""
    root = os.environ.get("KEEL_CACHE_DIR") or Path.home() / ".cache" / "keel"
    return Path(root)


def read_json(path: Path) -> dict:
    """A JSON object keel wrote, or {} when the file is missing, unreadable or not JSON (a run still being made)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


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
    mode = 0o666 & ~_umask()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            os.chmod(p, mode)  # writers that go through mkstemp (transformers' save_pretrained) leave 0600
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            files[p.relative_to(folder).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    atomic_write_json(folder / MANIFEST, {"format": "keel-manifest/1", "files": files, **(extra or {})})


def verify_manifest(folder: Path) -> dict:
    """Check every file against the manifest, and that the folder holds no file the manifest does not list
    (loaders such as transformers' pick up files by name: a dropped-in adapter or config changes the model).
    Raises IntegrityError naming the first bad file."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise IntegrityError(
            f"{folder} has no {MANIFEST}: it is incomplete or was tampered with; re-create it or "
            "point at another folder"
        )
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        listed = {name: (int(meta["bytes"]), str(meta["sha256"])) for name, meta in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise IntegrityError(f"{mpath} is corrupt; re-create {folder}") from None
    for p in sorted(folder.rglob("*")):
        name = p.relative_to(folder).as_posix()
        if name == MANIFEST or name in listed or p.is_dir() or _unsealed(name):
            continue
        raise IntegrityError(
            f"{p} is not part of the sealed folder {folder} (its manifest does not list it), and "
            "could change what is loaded; remove it, or re-create the folder"
        )
    for name, (size, digest) in listed.items():
        p = folder / name
        if not p.is_file():
            raise IntegrityError(f"{p} is missing; {folder} is incomplete: re-create it")
        if p.stat().st_size != size or sha256_file(p) != digest:
            raise IntegrityError(f"checksum mismatch in {p}: the file is corrupt; restore it or re-create {folder}")
    return manifest


def _unsealed(name: str) -> bool:
    """A file a later stage may add (and its atomic-write temporary); never read by a loader."""
    return any(name == u or (name.startswith(f".{u}.") and name.endswith(".tmp")) for u in UNSEALED)


# -- one writer per run directory -------------------------------------------------------------------

_HELD: dict[str, list] = {}  # lock root -> [open file, depth]: the lock is re-entrant within a process


def lock_root(path: Path) -> Path:
    """The run directory a path belongs to: the nearest folder (itself or above) with a run.json, else itself.
    A compression stage (RUN/compress/student) is written under its run's lock."""
    path = Path(path).resolve()
    for p in (path, *path.parents):
        if (p / "run.json").is_file():
            return p
    return path


def _command() -> str:
    import shlex
    import sys

    args = list(sys.argv)
    if args and Path(args[0]).name in ("__main__.py", "keel", "-c"):
        args[0] = "keel"
    return shlex.join(args)[:300]


def acquire_run_lock(run_dir: Path) -> None:
    """Take the run directory's writer lock (an advisory flock on RUN/.keel.lock naming the holder's PID and
    command), or raise KeelError naming the process that holds it. A lock left by a dead process is free
    (the kernel drops a process's flocks when it dies) and is taken over. Release with release_run_lock."""
    import fcntl
    import socket
    import time

    root = lock_root(run_dir)
    key = str(root)
    if key in _HELD:
        _HELD[key][1] += 1
        return
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK
    for _ in range(5):  # the holder may unlink the file between our open and flock: then lock the new one
        f = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _parse_holder(f.read())
            f.close()
            raise KeelError(
                f"{root} is in use by another keel process ({_describe(holder)}); only one process may "
                "write to a run directory: wait for it to finish (or stop it), then try again"
            ) from None
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    else:
        raise KeelError(f"could not lock {path}: it keeps being replaced; try again")
    f.seek(0)
    stale = _parse_holder(f.read())
    if stale.get("pid") and stale.get("pid") != os.getpid():
        logger.info(f"took over the lock of {root} left by a process that is no longer running ({_describe(stale)})")
    f.seek(0)
    f.truncate()
    f.write(
        json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": _command(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
        )
        + "\n"
    )
    f.flush()
    _HELD[key] = [f, 1]


def release_run_lock(run_dir: Path) -> None:
    key = str(lock_root(run_dir))
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] > 0:
        return
    del _HELD[key]
    f = held[0]
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path(key) / LOCK)  # unlinked while still locked: a waiting opener then re-checks the inode
    f.close()


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[Path]:
    """Hold the run directory's writer lock for the block (see acquire_run_lock)."""
    acquire_run_lock(run_dir)
    try:
        yield Path(run_dir)
    finally:
        release_run_lock(run_dir)


def writes_run(fn):
    """Decorator for a function whose first argument is a run directory it writes to: it runs under the lock."""
    import functools

    @functools.wraps(fn)
    def locked(run_dir, *args, **kwargs):
        with run_lock(Path(run_dir)):
            return fn(run_dir, *args, **kwargs)

    return locked


def _parse_holder(text: str) -> dict:
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "its PID is not recorded yet"
    return f"PID {holder.get('pid')} on {holder.get('host')}, `{holder.get('command')}`, since {holder.get('since')}"
