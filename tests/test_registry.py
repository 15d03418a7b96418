"""Model names: a Hugging Face name resolves from the user's hub cache offline (for a recipe and for `keel serve`),
and a name that resolves nowhere says what it is not and how to get it."""

from __future__ import annotations

import shutil

import httpx
import pytest
from conftest import keel
from serve_helpers import Server

pytestmark = pytest.mark.slow  # trains and serves a model from a Hugging Face cache

HUB_NAME = "keel-test/tiny-bert"
REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hugging Face hub cache holding the registry's tiny-bert as ``keel-test/tiny-bert`` (revision main), laid out
    as huggingface_hub writes it: models--ORG--NAME/refs/main and snapshots/<commit>/."""
    from keel.models.registry import model_dir

    cache = tmp_path_factory.mktemp("hf-home") / "hub"
    repo = cache / f"models--{HUB_NAME.replace('/', '--')}"
    snapshot = repo / "snapshots" / REV
    snapshot.mkdir(parents=True)
    for f in model_dir("tiny-bert").iterdir():
        if f.name != "manifest.json":  # a model from the hub carries no keel manifest
            shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    return cache


def test_a_recipe_trains_on_a_hub_name_from_the_cache(tiny_recipe, tmp_path, hub_cache):
    recipe = tiny_recipe(epochs=1)
    recipe.write_text(recipe.read_text().replace("name: tiny-bert", f"name: {HUB_NAME}"))
    env = {"HF_HUB_CACHE": str(hub_cache)}
    r = keel("train", str(recipe), "output.dir=runs/hub", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "runs/hub/model/model.safetensors").is_file()

    empty = tmp_path / "empty-hub"
    empty.mkdir()
    r = keel("validate", str(recipe), cwd=tmp_path, env={"HF_HUB_CACHE": str(empty)})
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"model.name: '{HUB_NAME}': no such model;" in err and "Hugging Face cache" in err
    assert f"hf download {HUB_NAME}" in err


def test_a_cached_hub_model_without_safetensors_is_refused(tmp_path, hub_cache):
    cache = tmp_path / "hub"
    shutil.copytree(hub_cache, cache)
    for f in cache.rglob("*.safetensors"):
        f.unlink()
    r = keel("serve", HUB_NAME, "--port", "0", cwd=tmp_path, env={"HF_HUB_CACHE": str(cache)})
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "has no .safetensors weights" in err and f"hf download {HUB_NAME}" in err


def test_keel_serve_loads_a_hub_name_from_the_cache(tmp_path, hub_cache):
    server = Server(HUB_NAME, "--set", "serve.num_threads=1", env={"HF_HUB_CACHE": str(hub_cache)}, cwd=tmp_path)
    try:
        assert [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]] == [HUB_NAME]
        r = httpx.post(f"{server.url}/v1/embeddings", json={"input": "hello", "model": HUB_NAME}, timeout=30)
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 32
    finally:
        server.stop()


def test_keel_serve_of_a_missing_run_says_no_such_run_or_model(tmp_path):
    (tmp_path / "runs").mkdir()
    r = keel("serve", "runs/nope", "--port", "0", cwd=tmp_path)
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "keel serve: 'runs/nope': no such run directory or model;" in err and "check the path" in err
    assert "model.name" not in err
