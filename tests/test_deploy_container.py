"""deploy/docker/Dockerfile keeps its contract (multi-stage from the lock files, non-root, read-only model, keel serve,
a HEALTHCHECK on keel's readiness), benchmarks/container.py stages a context it can build, and, where a docker daemon
and the built image are there, the image serves a run directory mounted read-only."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import OFFLINE

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"


def _script():
    spec = importlib.util.spec_from_file_location("container_bench", ROOT / "benchmarks" / "container.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())  # continuation lines joined
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            rows.append((word.upper(), rest.strip()))
    return rows


def test_the_dockerfile_is_multi_stage_non_root_and_checks_keels_readiness():
    from keel.serve.guard import OPEN_PATHS

    rows = _instructions()
    froms = [rest for word, rest in rows if word == "FROM"]
    assert rows[0] == ("ARG", "BASE=python:3.11-slim-bookworm")  # the base is a build argument
    assert froms == ["${BASE} AS build", "${BASE}"]
    final = rows[[i for i, (w, _) in enumerate(rows) if w == "FROM"][-1] :]
    assert ("COPY", "--from=build /opt/keel /opt/keel") in final
    assert not any(w == "COPY" and "--from" not in r for w, r in final)  # no wheels, CA or sources in the image
    [user] = [r for w, r in final if w == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    build = " ".join(r for w, r in rows if w == "RUN")
    assert "-r /build/requirements.txt -c /build/constraints" in build  # keel's lock files
    [health] = [r for w, r in final if w == "HEALTHCHECK"]
    probed = re.search(r"http://127\.0\.0\.1:8000(/[\w/]+)", health).group(1)
    assert probed == "/health/ready" and probed in OPEN_PATHS  # no key needed for the probe
    assert ("ENTRYPOINT", '["keel", "serve"]') in final
    assert ("CMD", '["/model", "--host", "0.0.0.0", "--port", "8000"]') in final
    env = " ".join(r for w, r in final if w == "ENV")
    assert "HF_HUB_OFFLINE=1" in env and "HOME=/tmp" in env and "KEEL_CACHE_DIR=/tmp/" in env


def test_the_staged_context_holds_what_the_dockerfile_copies(tmp_path):
    container = _script()
    info = container.stage(tmp_path)
    copied = {
        part.rstrip("/")
        for word, rest in _instructions()
        if word == "COPY" and "--from" not in rest
        for part in rest.split()[:-1]
    }
    assert copied and all((tmp_path / name).exists() for name in copied), copied
    assert (tmp_path / "keel" / "serve" / "app.py").is_file() and not list(tmp_path.rglob("__pycache__"))
    assert (tmp_path / "constraints.txt").read_text() == (ROOT / "constraints.txt").read_text()
    assert all(name.startswith("torch-") and "+cpu" in name for name in info["torch_wheels"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_image_serves_a_run_mounted_read_only(tmp_path):
    container = _script()
    why = container.docker_ok()
    if why:
        pytest.skip(f"{why}: the image check needs a docker daemon")
    built_from = container.image_source("keel:cpu")
    if built_from is None:
        pytest.skip("no keel:cpu image here; build it with `make image` (benchmarks/container.py)")
    if built_from != container.source_digest():  # a run trained by this tree may not load in an older keel
        pytest.skip("keel:cpu was built from another keel source or lock file; rebuild it with `make image`")
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "container.py"),
            "--skip-build",
            "--port",
            "18181",
            "--out",
            str(tmp_path / "c.json"),
        ],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, **OFFLINE},
        timeout=850,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ok: True" in r.stdout
