"""Encryption at rest (keel/secure/seal.py) on a small folder: round trips, rotation and every tamper case."""

import hashlib
import json
import os

import pytest

from keel.io import write_manifest
from keel.secure import seal as sealing
from keel.secure.seal import SealError, open_folder, seal_folder, unseal_folder

KEY, OTHER = bytes(range(32)), bytes(range(1, 33))


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setattr(sealing, "CHUNK", 64)  # several chunks per file
    f = tmp_path / "model"
    f.mkdir()
    (f / "model.safetensors").write_bytes(os.urandom(64 * 5 + 17))
    (f / "tokenizer.json").write_bytes(os.urandom(64 * 3))  # an exact multiple of the chunk
    (f / "empty.txt").write_bytes(b"")
    (f / "keel.json").write_text(json.dumps({"task": "classification"}))
    write_manifest(f)
    return f


def plain(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != "manifest.json"}


def test_round_trip_in_memory_and_on_disk(folder):
    before = plain(folder)
    seal_folder(folder, KEY)
    assert not (folder / "model.safetensors").exists()
    assert before["model.safetensors"] not in (folder / "model.safetensors.sealed").read_bytes()
    assert open_folder(folder, KEY) == before
    unseal_folder(folder, KEY)
    assert plain(folder) == before
    from keel.io import verify_manifest

    verify_manifest(folder)


def test_rotation_re_seals_under_the_new_key(folder):
    before = plain(folder)
    seal_folder(folder, KEY)
    seal_folder(folder, OTHER, old_key=KEY)
    assert open_folder(folder, OTHER) == before
    with pytest.raises(SealError, match="does not open"):
        open_folder(folder, KEY)


def test_a_wrong_key_is_refused(folder):
    seal_folder(folder, KEY)
    with pytest.raises(SealError, match="seal key does not open"):
        open_folder(folder, OTHER)


def _reseal_outer_manifest(folder):
    """What an attacker can do without the key: rewrite the plaintext manifest over the changed ciphertext."""
    (folder / "manifest.json").unlink()
    write_manifest(folder)


def test_a_flipped_byte_in_a_chunk_is_refused(folder):
    seal_folder(folder, KEY)
    p = folder / "model.safetensors.sealed"
    data = bytearray(p.read_bytes())
    data[100] ^= 1  # inside chunk 1 (chunks are 64 + 16 bytes on disk)
    p.write_bytes(bytes(data))
    _reseal_outer_manifest(folder)
    with pytest.raises(SealError, match="chunk 1 of .*does not authenticate"):
        open_folder(folder, KEY)


def test_reordered_chunks_are_refused(folder):
    seal_folder(folder, KEY)
    p = folder / "model.safetensors.sealed"
    step = 64 + 16
    data = p.read_bytes()
    p.write_bytes(data[step : 2 * step] + data[:step] + data[2 * step :])
    _reseal_outer_manifest(folder)
    with pytest.raises(SealError, match="chunk 0 of .*does not authenticate"):
        open_folder(folder, KEY)


@pytest.mark.parametrize("name", ["model.safetensors.sealed", "tokenizer.json.sealed"])
def test_a_truncated_file_is_refused(folder, name):
    seal_folder(folder, KEY)
    header = json.loads((folder / "seal.json").read_text())
    p = folder / name
    p.write_bytes(p.read_bytes()[: -(64 + 16)])  # one whole chunk dropped at a boundary
    base = name.removesuffix(".sealed")
    header["files"][base]["chunks"] -= 1  # the header is not secret: an attacker can edit it too
    (folder / "seal.json").write_text(json.dumps(header))
    _reseal_outer_manifest(folder)
    with pytest.raises(SealError, match="does not authenticate"):
        open_folder(folder, KEY)


def test_a_chunk_swapped_between_files_is_refused(folder):
    seal_folder(folder, KEY)
    a, b = folder / "model.safetensors.sealed", folder / "tokenizer.json.sealed"
    step = 64 + 16
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db[:step] + da[step:])
    _reseal_outer_manifest(folder)
    with pytest.raises(SealError, match="does not authenticate"):
        open_folder(folder, KEY)


def test_a_removed_file_is_refused(folder):
    seal_folder(folder, KEY)
    header = json.loads((folder / "seal.json").read_text())
    del header["files"]["tokenizer.json"]
    (folder / "seal.json").write_text(json.dumps(header))
    (folder / "tokenizer.json.sealed").unlink()
    _reseal_outer_manifest(folder)
    with pytest.raises(SealError, match="tokenizer.json is missing"):
        open_folder(folder, KEY)


def test_an_added_file_is_refused(folder):
    seal_folder(folder, KEY)
    (folder / "adapter_config.json").write_text("{}")
    with pytest.raises(SealError, match="not part of the sealed folder"):
        open_folder(folder, KEY)
    _reseal_outer_manifest(folder)  # listed in the plaintext manifest too
    with pytest.raises(SealError, match="not part of the sealed folder"):
        open_folder(folder, KEY)


def test_an_edited_clear_keel_json_is_refused(folder):
    seal_folder(folder, KEY)
    (folder / "keel.json").write_text(json.dumps({"task": "causal-lm"}))
    _reseal_outer_manifest(folder)
    with pytest.raises(SealError, match="keel.json .*not the file that was sealed"):
        open_folder(folder, KEY)


def test_keys_parse_from_hex_or_base64_and_errors_never_show_the_key(tmp_path, monkeypatch):
    assert sealing.parse_key(KEY.hex(), "x") == KEY
    import base64

    assert sealing.parse_key(base64.b64encode(KEY).decode(), "x") == KEY
    secret = "s3cret-not-a-key-value"
    monkeypatch.setenv("KEEL_SEAL_KEY", secret)
    monkeypatch.delenv("KEEL_SEAL_KEY_FILE", raising=False)
    with pytest.raises(SealError) as e:
        sealing.load_key()
    assert "$KEEL_SEAL_KEY is not a 32-byte key" in str(e.value) and secret not in str(e.value)
    monkeypatch.delenv("KEEL_SEAL_KEY")
    with pytest.raises(SealError, match="no seal key"):
        sealing.load_key()


def test_sealing_twice_without_a_new_key_is_refused_and_changes_nothing(folder):
    seal_folder(folder, KEY)
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    with pytest.raises(SealError, match="already sealed"):
        seal_folder(folder, KEY)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()} == digest


def test_a_sealed_causal_lm_serves_the_same_logits_from_memory(tmp_path, tiny_lm):
    import torch

    from keel.serve.engines import _load_lm

    model, tok = tiny_lm
    folder = tmp_path / "lm"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    write_manifest(folder)
    plain = _load_lm(folder, "lm", "cpu")
    seal_folder(folder, KEY)
    os.environ["KEEL_SEAL_KEY"] = KEY.hex()
    try:
        sealed = _load_lm(folder, "lm", "cpu")
    finally:
        del os.environ["KEEL_SEAL_KEY"]
    ids = plain.prompt_ids("the quick brown fox")
    assert sealed.prompt_ids("the quick brown fox") == ids
    with torch.inference_mode():
        a, b = plain.lm(torch.tensor([ids])).logits, sealed.lm(torch.tensor([ids])).logits  # (1, T, V)
    assert torch.equal(a, b)
