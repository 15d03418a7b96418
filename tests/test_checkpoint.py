import json
import random

import numpy as np
import pytest
import torch

from keel.errors import CheckpointError
from keel.io import atomic_dir, verify_manifest
from keel.train import checkpoint as ckpt


def tiny_model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        m(torch.randn(5, 4)).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return m, opt, sched


def save(root, m, opt, sched, step=7):
    state = ckpt.TrainState(step=step, epoch=1, batch_in_epoch=3)
    return ckpt.save_checkpoint(root, m, opt, sched, state, "name: x\n", "abc", [ckpt.capture_rng()])


def test_roundtrip_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    m, opt, sched = tiny_model()
    path = save(tmp_path, m, opt, sched)
    expected_rand = (torch.rand(3), np.random.rand(), random.random())

    m2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    loaded = ckpt.load_checkpoint(path, m2)
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    opt2.load_state_dict(loaded.optimizer)
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(v, opt2.state_dict()["state"][0][k])
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    sched2.load_state_dict(loaded.scheduler)
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert loaded.state.step == 7 and loaded.state.batch_in_epoch == 3
    ckpt.restore_rng(*loaded.rng)
    got = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(got[0], expected_rand[0]) and got[1:] == expected_rand[1:]


def test_no_pickle_in_a_checkpoint(tmp_path):
    m, opt, sched = tiny_model()
    path = save(tmp_path, m, opt, sched)
    names = sorted(p.name for p in path.iterdir())
    assert names == [
        "manifest.json",
        "model.safetensors",
        "optimizer.safetensors",
        "recipe.yaml",
        "rng-rank0.safetensors",
        "state.json",
    ]
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == set(names) - {"manifest.json"}


def test_flipped_byte_fails_with_checksum_error(tmp_path):
    m, opt, sched = tiny_model()
    path = save(tmp_path, m, opt, sched)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch in .*model.safetensors"):
        ckpt.load_checkpoint(path, m)


def test_interrupted_write_leaves_no_complete_looking_checkpoint(tmp_path):
    m, opt, sched = tiny_model()
    save(tmp_path, m, opt, sched, step=1)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with atomic_dir(ckpt.step_dir(tmp_path, 2)) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise Boom
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000001"]
    # a folder that a kill -9 left behind (no manifest, temp name) is never listed, and is cleaned up
    stale = tmp_path / ".tmp-step-00000003-xyz"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000001"]
    assert ckpt.clean_partial(tmp_path) == 1 and not stale.exists()
    # a step-* folder without a manifest is not complete either
    (tmp_path / "step-00000004").mkdir()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000001"]
    with pytest.raises(CheckpointError, match="no manifest.json"):
        verify_manifest(tmp_path / "step-00000004")


def test_keep_last_k(tmp_path):
    m, opt, sched = tiny_model()
    for step in range(1, 6):
        save(tmp_path, m, opt, sched, step=step)
        ckpt.prune_checkpoints(tmp_path, 2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]


def test_wrong_shape_is_a_clear_error(tmp_path):
    m, opt, sched = tiny_model()
    path = save(tmp_path, m, opt, sched)
    other = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    with pytest.raises(CheckpointError, match="do not fit this model"):
        ckpt.load_checkpoint(path, other)


def test_a_sealed_folder_holds_only_its_listed_files(tmp_path):
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    folder = tmp_path / "model"
    verify_manifest(folder)
    (folder / "MODEL_CARD.md").write_text("# card\n")  # written by later stages, read by no loader
    verify_manifest(folder)
    (folder / "sub").mkdir()
    (folder / "sub" / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="sub/adapter_config.json is not part of the sealed folder"):
        verify_manifest(folder)


def test_resume_point_falls_back_past_a_corrupt_checkpoint_and_names_it(tmp_path, capsys):
    m, opt, sched = tiny_model()
    save(tmp_path, m, opt, sched, step=3)
    newest = save(tmp_path, m, opt, sched, step=5)
    (newest / "stray.bin").write_bytes(b"x")  # a file the manifest does not list: not intact
    loaded = ckpt.resume_point(tmp_path, m, recipe=None)
    assert loaded.state.step == 3 and loaded.path.name == "step-00000003"
    out = "".join(capsys.readouterr())
    assert "skipping checkpoint step-00000005" in out and "stray.bin" in out
    assert ckpt.resume_point(tmp_path / "none", m, recipe=None) is None  # nothing checkpointed
    (tmp_path / "step-00000003" / "state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no intact checkpoint .* step-00000005 .* step-00000003"):
        ckpt.resume_point(tmp_path, m, recipe=None)


def test_a_changed_setting_is_not_a_reason_to_fall_back(tmp_path):
    m, opt, sched = tiny_model()
    save(tmp_path, m, opt, sched, step=3)
    save(tmp_path, m, opt, sched, step=5)

    def check(saved_yaml, recipe):
        raise CheckpointError("cannot resume: model.name changed")

    with pytest.raises(CheckpointError, match="model.name changed"):
        ckpt.resume_point(tmp_path, m, recipe=None, check=check)


def test_a_sealed_folder_has_the_usual_file_permissions(tmp_path):
    """A file written 0600 (as transformers' save_pretrained does) is readable by others once sealed, per the umask:
    a container's non-root user can then read a run directory mounted read-only."""
    import os
    import stat

    from keel.io import atomic_dir

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
            os.chmod(tmp / "model.safetensors", 0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model" / "model.safetensors").stat().st_mode) == 0o644


def test_weights_already_sealed_are_linked_not_written_again(tmp_path):
    m, opt, sched = tiny_model()
    with atomic_dir(tmp_path / "best") as tmp:
        from safetensors.torch import save_model

        save_model(m, str(tmp / "model.safetensors"))
    best = tmp_path / "best" / "model.safetensors"
    state = ckpt.TrainState(step=7, epoch=1)
    path = ckpt.save_checkpoint(
        tmp_path / "ck", m, opt, sched, state, "name: x\n", "abc", [ckpt.capture_rng()], weights_from=best
    )
    assert (path / "model.safetensors").stat().st_ino == best.stat().st_ino  # one file, two names
    import shutil

    shutil.rmtree(tmp_path / "best")  # replaced or removed later: the checkpoint keeps its weights
    verify_manifest(path)
    m2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    ckpt.load_checkpoint(path, m2)
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    # where a link cannot be made (here: no such file), the weights are written
    other = ckpt.save_checkpoint(
        tmp_path / "ck2", m, opt, sched, state, "name: x\n", "abc", [ckpt.capture_rng()], weights_from=best
    )
    verify_manifest(other)
