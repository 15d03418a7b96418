"""Build keel's serving image (deploy/docker/Dockerfile) and run it for real on a run directory mounted read-only.

    python benchmarks/container.py                          # stage, build keel:cpu, run, check, write JSON
    python benchmarks/container.py --skip-build             # run and check an image built before
    python benchmarks/container.py --base local/python-base:3.11-bookworm --make-base
                                    # no registry: first make a local Python base with debootstrap
    python benchmarks/container.py --run runs/quickstart    # serve this run (default: train the tiny recipe)

Needs a docker daemon. The build context is staged in a temporary folder: keel's source, requirements.txt and
constraints.txt, the torch wheel from pip's find-links folder (when it has one) and pip's CA bundle (when pip is
set up with one; it stays in the build stage). The checks: the container runs as a non-root user with a
read-only root filesystem and /model read-only, docker's HEALTHCHECK turns healthy, /health/ready and KServe's
/v2/health/ready answer 200, a classify call answers 200 with a key and 401 without one. Writes
benchmarks/results/container-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
KEY = "container-check-key-0123456789"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def sh(*cmd: str, check: bool = True, capture: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), text=True, capture_output=capture, env=env)
    if check and r.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd[:4])} ... failed ({r.returncode}):\n{(r.stdout or '')[-3000:]}{r.stderr or ''}"
        )
    return r


def docker_ok() -> str | None:
    """None when a docker daemon answers, else why not."""
    if not shutil.which("docker"):
        return "no docker client on PATH"
    r = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    return None if r.returncode == 0 else "no docker daemon answers (start dockerd)"


def pip_setting(name: str) -> str | None:
    r = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    for line in r.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.split(".")[-1] == name:
            return value.strip().strip("'\"")
    return os.environ.get(f"PIP_{name.upper().replace('-', '_')}")


def source_digest(root: Path = ROOT) -> str:
    """SHA-256 over keel's source and lock files: the image's org.keel.source label, to tell a stale image."""
    import hashlib

    h = hashlib.sha256()
    files = [root / n for n in ("pyproject.toml", "requirements.txt", "constraints.txt")]
    files += sorted(p for p in (root / "keel").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in files:
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def image_source(image: str) -> str | None:
    """The org.keel.source label of ``image``, or None when there is no such image."""
    r = subprocess.run(
        ["docker", "image", "inspect", "-f", '{{index .Config.Labels "org.keel.source"}}', image],
        capture_output=True,
        text=True,
    )
    return r.stdout.strip() if r.returncode == 0 else None


def stage(context: Path) -> dict:
    """keel's source and lock files, the local torch wheel and pip's CA bundle, as the Dockerfile expects them."""
    for name in ("pyproject.toml", "README.md", "requirements.txt", "constraints.txt"):
        shutil.copy2(ROOT / name, context / name)
    shutil.copytree(ROOT / "keel", context / "keel", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "deploy" / "docker" / "Dockerfile", context / "Dockerfile")
    (context / "wheels").mkdir()
    (context / "ca").mkdir()
    torch_pin = next(ln for ln in (ROOT / "constraints.txt").read_text().splitlines() if ln.startswith("torch=="))
    version = torch_pin.split("==")[1].split("+")[0]
    wheels = []
    for folder in (pip_setting("find-links") or "").split():
        for wheel in Path(folder).glob(f"torch-{version}+cpu-*.whl"):
            shutil.copy2(wheel, context / "wheels" / wheel.name)
            wheels.append(wheel.name)
    cert = pip_setting("cert")
    if cert and Path(cert).is_file():
        shutil.copy2(cert, context / "ca" / "ca.crt")
    return {"torch_wheels": wheels, "ca_bundle": bool(cert and Path(cert).is_file())}


def make_base(tag: str) -> None:
    """A Debian bookworm root filesystem with python3.11, venv and pip (debootstrap), imported as ``tag``."""
    if not shutil.which("debootstrap"):
        raise SystemExit("--make-base needs debootstrap (apt-get install debootstrap)")
    with tempfile.TemporaryDirectory(prefix="keel-base-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        include = "python3.11,python3.11-venv,python3-pip,ca-certificates"
        sh("debootstrap", "--variant=minbase", f"--include={include}", "bookworm", str(rootfs), capture=False)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-", tag], stdin=tar.stdout, check=True)
        tar.wait()


def tiny_run(workdir: Path) -> Path:
    """The built-in tiny recipe trained into ``workdir``: a real run directory in seconds."""
    run = workdir / "tiny-run"
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT)}
    sh(sys.executable, "-m", "keel", "train", "tiny", f"output.dir={run}", env=env)
    return run


def readable_copy(run: Path, workdir: Path) -> Path:
    """The run directory (less its checkpoints) with every file readable by the image's user (uid 10001).

    keel writes a run with the umask's permissions (0644 by default), but a run made under a stricter umask or by an
    older keel is not readable by others; the copy makes the check independent of how the run was written."""
    copy = workdir / "model-mount"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    for path in [copy, *copy.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return copy


def wait_ready(url: str, container: str, timeout_s: float = 240) -> float:
    t0, end = time.perf_counter(), time.time() + timeout_s
    while time.time() < end:
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        state = sh("docker", "inspect", "-f", "{{.State.Status}}", container, check=False).stdout.strip()
        if state not in ("running", "created"):
            break
        time.sleep(0.5)
    logs = sh("docker", "logs", container, check=False)
    raise SystemExit(f"the container never became ready:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")


def docker_health(container: str, timeout_s: float = 120) -> str:
    end = time.time() + timeout_s
    status = ""
    while time.time() < end:
        status = sh("docker", "inspect", "-f", "{{.State.Health.Status}}", container, check=False).stdout.strip()
        if status in ("healthy", "unhealthy"):
            return status
        time.sleep(1)
    return status


def check(image: str, run: Path, port: int) -> dict:
    name = f"keel-check-{os.getpid()}"
    sh(
        "docker", "run", "-d", "--name", name,
        "--read-only", "--tmpfs", "/tmp:rw,size=512m",
        "-v", f"{run.resolve()}:/model:ro",
        "-e", f"KEEL_API_KEYS={KEY}",
        "-p", f"127.0.0.1:{port}:8000",
        image,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        ready_s = wait_ready(url, name)
        auth = {"Authorization": f"Bearer {KEY}"}
        texts = ["I love my new self-driving car", "the ride was awful"]
        answer = httpx.post(f"{url}/v1/classify", json={"input": texts}, headers=auth, timeout=30)
        refused = httpx.post(f"{url}/v1/classify", json={"input": texts}, timeout=30)
        kserve = httpx.get(f"{url}/v2/health/ready", timeout=5)
        uid = sh("docker", "exec", name, "id", "-u").stdout.strip()
        root_write = sh("docker", "exec", name, "touch", "/opt/keel/x", check=False).returncode
        model_write = sh("docker", "exec", name, "touch", "/model/x", check=False).returncode
        result = {
            "ready_s": round(ready_s, 1),
            "docker_health": docker_health(name),
            "classify_status": answer.status_code,
            "classify_labels": [row["label"] for row in answer.json()["data"]] if answer.status_code == 200 else None,
            "without_key_status": refused.status_code,
            "kserve_ready_status": kserve.status_code,
            "uid": int(uid),
            "root_fs_writable": root_write == 0,
            "model_dir_writable": model_write == 0,
        }
    finally:
        sh("docker", "rm", "-f", name, check=False)
    result["ok"] = (
        result["classify_status"] == 200
        and result["without_key_status"] == 401
        and result["kserve_ready_status"] == 200
        and result["docker_health"] == "healthy"
        and result["uid"] != 0
        and not result["root_fs_writable"]
        and not result["model_dir_writable"]
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image", default="keel:cpu")
    ap.add_argument("--base", default="python:3.11-slim-bookworm", help="the BASE build argument")
    ap.add_argument("--make-base", action="store_true", help="make --base with debootstrap first")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--run", type=Path, help="run directory to mount at /model (default: train the tiny recipe)")
    ap.add_argument("--port", type=int, default=18080)
    ap.add_argument("--out", type=Path, default=RESULTS / "container-cpu.json", help="where the JSON goes")
    args = ap.parse_args()
    why = docker_ok()
    if why:
        raise SystemExit(f"benchmarks/container.py: {why}")
    report: dict = {"image": args.image}
    if args.make_base:
        make_base(args.base)
    with tempfile.TemporaryDirectory(prefix="keel-image-") as tmp:
        if not args.skip_build:
            context = Path(tmp) / "context"
            context.mkdir()
            report["base"] = args.base
            report["context"] = stage(context)
            env = dict(os.environ)
            if subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode != 0:
                env["DOCKER_BUILDKIT"] = "0"  # no buildx plugin: the classic builder (the Dockerfile needs no BuildKit)
            t0 = time.perf_counter()
            build = ["docker", "build", "-t", args.image, "--build-arg", f"BASE={args.base}"]
            build += ["--build-arg", f"KEEL_SOURCE={source_digest()}"]
            if report["context"]["torch_wheels"]:
                build += ["--build-arg", "TORCH_INDEX="]  # the staged wheel only
            sh(*build, str(context), capture=False, env=env)
            report["build_s"] = round(time.perf_counter() - t0, 1)
        size = sh("docker", "image", "inspect", "-f", "{{.Size}}", args.image).stdout.strip()
        report["image_mb"] = round(int(size) / 2**20)
        run = args.run or tiny_run(Path(tmp))
        report["run"] = f"{args.run.name} (given)" if args.run else "the built-in tiny recipe, trained here"
        report.update(check(args.image, readable_copy(run, Path(tmp)), args.port))
    for key, value in report.items():
        print(f"{key:>22}: {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
