"""Encryption at rest: `keel seal RUN` / `keel unseal RUN`, and opening a sealed model in memory.

A sealed folder (RUN/model/, RUN/export/<variant>/) holds, instead of its files, ``<name>.sealed`` for each of them
(the folder's own manifest.json included), ``seal.json`` (the header: cipher, chunk size, a key check, one random id
per file), keel.json in the clear (task, labels, the sealed recipe: what `keel` needs to know how to run it; it is
also checked against the encrypted manifest on opening) and a new manifest.json over those files.

Each file is cut into chunks of ``chunk_bytes``, each encrypted with AES-256-GCM under the nonce ``file id (8 bytes)
|| chunk index (4 bytes)`` and authenticated together with the file's name, its id, the chunk's index and whether it
is the last one: a chunk moved to another file or position, a dropped tail, a flipped byte all fail to decrypt.
A missing or added file is caught by the encrypted manifest (and the outer one). Plaintext never touches the disk:
unsealing writes through an atomic folder, and loading decrypts into memory.

The key: 32 bytes, base64 or hex, from $KEEL_SEAL_KEY or a key file ($KEEL_SEAL_KEY_FILE or ``--key-file``); never from
a recipe, never printed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
import shutil
import struct
from pathlib import Path

from keel.errors import KeelError
from keel.io import MANIFEST, UNSEALED, atomic_dir, verify_manifest

FORMAT = "keel-seal/1"
HEADER = "seal.json"
SUFFIX = ".sealed"
CHUNK = 1 << 20  # plaintext bytes per chunk
TAG = 16
KEY_ENV, KEY_FILE_ENV = "KEEL_SEAL_KEY", "KEEL_SEAL_KEY_FILE"
NEW_KEY_ENV, NEW_KEY_FILE_ENV = "KEEL_SEAL_NEW_KEY", "KEEL_SEAL_NEW_KEY_FILE"
CLEAR = ("keel.json",)  # read before opening (what kind of model); bound by the encrypted manifest
_CHECK = b"keel-seal key check"


class SealError(KeelError):
    """A sealed folder that cannot be opened: no key, a wrong key, or files that are not the ones sealed."""


# -- keys --------------------------------------------------------------------------------------------


def parse_key(text: str, source: str) -> bytes:
    """32 bytes from hex (64 characters) or base64 (44); the error names the source, never the value."""
    text = text.strip()
    try:
        key = bytes.fromhex(text) if len(text) == 64 else base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        key = b""
    if len(key) != 32:
        raise SealError(
            f"{source} is not a 32-byte key (64 hex characters or 44 base64 characters); create one "
            "with `keel seal --new-key > seal.key` (keep it out of recipes and logs)"
        )
    return key


def load_key(
    key_file: str | None = None, env: str = KEY_ENV, file_env: str = KEY_FILE_ENV, required: bool = True
) -> bytes | None:
    """The key from ``key_file``, else $KEEL_SEAL_KEY_FILE, else $KEEL_SEAL_KEY."""
    key_file = key_file or os.environ.get(file_env)
    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise SealError(f"key file {key_file} not found; pass the file that holds the 32-byte seal key")
        return parse_key(path.read_text(), f"key file {key_file}")
    if os.environ.get(env):
        return parse_key(os.environ[env], f"${env}")
    if required:
        raise SealError(
            f"no seal key: set ${env} (64 hex or 44 base64 characters) or ${file_env} (a file "
            "holding it), or pass --key-file"
        )
    return None


def new_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def _aead(key: bytes):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def _key_check(key: bytes) -> dict:
    nonce = secrets.token_bytes(12)
    return {"nonce": nonce.hex(), "value": _aead(key).encrypt(nonce, _CHECK, FORMAT.encode()).hex()}


def _check_key(key: bytes, header: dict, folder: Path) -> None:
    from cryptography.exceptions import InvalidTag

    try:
        check = header["key_check"]
        _aead(key).decrypt(bytes.fromhex(check["nonce"]), bytes.fromhex(check["value"]), FORMAT.encode())
    except (InvalidTag, KeyError, TypeError, ValueError):
        raise SealError(
            f"the seal key does not open {folder} (wrong key, or a header that was edited); pass the key "
            "it was sealed with"
        ) from None


# -- chunks ------------------------------------------------------------------------------------------


def _aad(name: str, file_id: bytes, index: int, final: bool) -> bytes:
    return FORMAT.encode() + b"\0" + name.encode() + b"\0" + file_id + struct.pack(">I?", index, final)


def _nonce(file_id: bytes, index: int) -> bytes:
    return file_id + struct.pack(">I", index)


def _plain_chunks(path: Path, chunk: int):
    """(index, bytes, is_last) over a plaintext file, reading one chunk ahead; an empty file is one empty chunk."""
    with open(path, "rb") as f:
        cur, i = f.read(chunk), 0
        while True:
            nxt = f.read(chunk)
            yield i, cur, not nxt
            if not nxt:
                return
            cur, i = nxt, i + 1


def _encrypt_file(aead, src_chunks, name: str, dst: Path) -> dict:
    file_id = secrets.token_bytes(8)
    n = 0
    with open(dst, "wb") as out:
        for i, data, last in src_chunks:
            out.write(aead.encrypt(_nonce(file_id, i), data, _aad(name, file_id, i, last)))
            n = i + 1
        out.flush()
        os.fsync(out.fileno())
    return {"id": file_id.hex(), "chunks": n}


def _decrypt_chunks(aead, path: Path, name: str, meta: dict, chunk: int, folder: Path):
    """Plaintext chunks of one sealed file; any change (a flipped byte, a moved or missing chunk) raises SealError."""
    from cryptography.exceptions import InvalidTag

    size, step = path.stat().st_size, chunk + TAG
    count = max(1, -(-size // step))
    if count != meta["chunks"]:
        raise SealError(
            f"{path} has {count} chunks where {meta['chunks']} were sealed: it was truncated or extended; "
            f"restore {folder} from a good copy"
        )
    file_id = bytes.fromhex(meta["id"])
    with open(path, "rb") as f:
        for i in range(count):
            try:
                yield aead.decrypt(_nonce(file_id, i), f.read(step), _aad(name, file_id, i, i == count - 1))
            except InvalidTag:
                raise SealError(
                    f"chunk {i} of {path} does not authenticate (changed, moved or swapped): "
                    f"{folder} was tampered with; restore it from a good copy"
                ) from None


def is_sealed(folder: Path) -> bool:
    return (Path(folder) / HEADER).is_file()


def _header(folder: Path) -> dict:
    try:
        header = json.loads((folder / HEADER).read_text())
        if header.get("format") != FORMAT:
            raise ValueError
        return header
    except (ValueError, OSError):
        raise SealError(f"{folder / HEADER} is not a {FORMAT} header; restore {folder} from a good copy") from None


def sealed_folders(run_dir: Path) -> list[Path]:
    """The folders `keel seal` covers: the final model and its exports (each one a folder with a manifest)."""
    run_dir = Path(run_dir)
    found = [run_dir / "model"] + sorted(p for p in (run_dir / "export").glob("*") if p.is_dir())
    return [p for p in found if (p / MANIFEST).is_file()]


# -- seal / unseal / rotate --------------------------------------------------------------------------


def seal_folder(folder: Path, key: bytes, old_key: bytes | None = None) -> dict:
    """Seal a plain folder under ``key``, or re-seal a sealed one from ``old_key`` to ``key`` (rotation)."""
    folder = Path(folder)
    verify_manifest(folder)  # never seal a folder that is already not what it claims to be
    aead = _aead(key)
    totals = {"folder": str(folder), "bytes": 0}
    rotating = is_sealed(folder)
    if rotating:
        if old_key is None:
            raise SealError(
                f"{folder} is already sealed; to rotate its key set ${NEW_KEY_ENV} (or "
                f"${NEW_KEY_FILE_ENV} / --new-key-file) beside the current one"
            )
        header = _header(folder)
        _check_key(old_key, header, folder)
        old = _aead(old_key)
    with atomic_dir(folder) as tmp:
        files = {}
        if rotating:
            for name, meta in header["files"].items():
                chunks = _decrypt_chunks(old, folder / (name + SUFFIX), name, meta, header["chunk_bytes"], folder)
                last = meta["chunks"] - 1
                files[name] = {
                    **_encrypt_file(
                        aead, ((i, c, i == last) for i, c in enumerate(chunks)), name, tmp / (name + SUFFIX)
                    ),
                    "bytes": meta["bytes"],
                }
                totals["bytes"] += meta["bytes"]
            keep = [n for n in (*CLEAR, *UNSEALED) if (folder / n).is_file()]
        else:
            for p in sorted(folder.rglob("*")):
                name = p.relative_to(folder).as_posix()
                if p.is_dir() or name in CLEAR or name in UNSEALED:
                    continue
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                files[name] = {
                    **_encrypt_file(aead, _plain_chunks(p, CHUNK), name, tmp / (name + SUFFIX)),
                    "bytes": p.stat().st_size,
                }
                totals["bytes"] += p.stat().st_size
            keep = [n for n in (*CLEAR, *UNSEALED) if (folder / n).is_file()]
        for name in keep:
            shutil.copy2(folder / name, tmp / name)
        header = {
            "format": FORMAT,
            "cipher": "AES-256-GCM",
            "chunk_bytes": header["chunk_bytes"] if rotating else CHUNK,
            "key_check": _key_check(key),
            "files": files,
        }
        (tmp / HEADER).write_text(json.dumps(header, indent=2))
    return totals


def unseal_folder(folder: Path, key: bytes) -> dict:
    """Decrypt a sealed folder back to its plain files (checked against its encrypted manifest before it replaces
    the sealed one)."""
    folder = Path(folder)
    verify_manifest(folder)
    header = _header(folder)
    _check_key(key, header, folder)
    aead = _aead(key)
    plain = _inner_manifest(aead, header, folder)
    with atomic_dir(folder) as tmp:
        for name, meta in header["files"].items():
            if name == MANIFEST:
                continue
            digest = hashlib.sha256()
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            with open(tmp / name, "wb") as out:
                for c in _decrypt_chunks(aead, folder / (name + SUFFIX), name, meta, header["chunk_bytes"], folder):
                    digest.update(c)
                    out.write(c)
            _check_plain(plain, name, digest.hexdigest(), folder)
        for name in (*CLEAR, *UNSEALED):
            if (folder / name).is_file():
                shutil.copy2(folder / name, tmp / name)
        _check_complete(
            plain, {n for n in header["files"] if n != MANIFEST} | {n for n in CLEAR if (tmp / n).is_file()}, folder
        )
        for name in CLEAR:
            if (tmp / name).is_file():
                _check_plain(plain, name, hashlib.sha256((tmp / name).read_bytes()).hexdigest(), folder)
    # atomic_dir wrote a fresh manifest over the same files: the same digests as the sealed one
    return {"folder": str(folder)}


def _inner_manifest(aead, header: dict, folder: Path) -> dict:
    meta = header["files"].get(MANIFEST)
    if meta is None:
        raise SealError(f"{folder} has no sealed manifest: it was tampered with; restore it from a good copy")
    data = b"".join(_decrypt_chunks(aead, folder / (MANIFEST + SUFFIX), MANIFEST, meta, header["chunk_bytes"], folder))
    return json.loads(data)["files"]


def _check_plain(plain: dict, name: str, digest: str, folder: Path) -> None:
    if name not in plain:
        raise SealError(
            f"{name} in {folder} is not a file that was sealed: it was added; remove it or restore "
            f"{folder} from a good copy"
        )
    if plain[name]["sha256"] != digest:
        raise SealError(f"{name} in {folder} is not the file that was sealed (sha256 differs); restore {folder}")


def _check_complete(plain: dict, present: set, folder: Path) -> None:
    missing = sorted(set(plain) - present)
    if missing:
        raise SealError(
            f"{missing[0]} is missing from sealed {folder}; it was removed: restore {folder} from a good copy"
        )


# -- open in memory ----------------------------------------------------------------------------------


def open_folder(folder: Path, key: bytes | None = None) -> dict[str, bytes]:
    """Every file of a sealed folder, decrypted into memory and checked against the manifest that was sealed."""
    folder = Path(folder)
    header = _header(folder)
    _check_listing(folder, header)  # the chunks authenticate themselves: no need to hash the ciphertext first
    key = key if key is not None else load_key()
    _check_key(key, header, folder)
    aead = _aead(key)
    plain = _inner_manifest(aead, header, folder)
    files = {}
    for name, meta in header["files"].items():
        if name == MANIFEST:
            continue
        files[name] = b"".join(
            _decrypt_chunks(aead, folder / (name + SUFFIX), name, meta, header["chunk_bytes"], folder)
        )
    for name in CLEAR:
        if (folder / name).is_file():
            files[name] = (folder / name).read_bytes()
    for name, data in files.items():
        _check_plain(plain, name, hashlib.sha256(data).hexdigest(), folder)
    _check_complete(plain, set(files), folder)
    return files


def _check_listing(folder: Path, header: dict) -> None:
    expected = {HEADER, MANIFEST, *CLEAR, *UNSEALED, *(name + SUFFIX for name in header["files"])}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.relative_to(folder).as_posix() not in expected:
            raise SealError(
                f"{p} is not part of the sealed folder {folder} (its header does not list it), and could "
                "change what is loaded; remove it, or restore the folder from a good copy"
            )


def seal_run(run_dir: Path, key: bytes, old_key: bytes | None = None) -> list[dict]:
    folders = sealed_folders(run_dir)
    if not folders:
        raise SealError(f"{run_dir} has no model to seal (model/ with a manifest); train it first")
    return [seal_folder(f, key, old_key) for f in folders]


def unseal_run(run_dir: Path, key: bytes) -> list[dict]:
    folders = [f for f in sealed_folders(run_dir) if is_sealed(f)]
    if not folders:
        raise SealError(f"{run_dir} is not sealed; nothing to unseal")
    return [unseal_folder(f, key) for f in folders]


def refuse_plain_outputs(run_dir: Path, verb: str) -> None:
    """A verb that writes new weights (export, compression) is refused on a sealed run: they would be plaintext."""
    if is_sealed(Path(run_dir) / "model"):
        raise SealError(
            f"{run_dir} is sealed and `keel {verb}` would write plaintext weights beside it; run `keel "
            f"unseal {run_dir}`, then `keel {verb}`, then `keel seal {run_dir}` again"
        )
