"""`keel train RECIPE --ray ADDRESS` on a local Ray cluster the test starts: 2 Ray Train workers, one killed mid-run;
the run resumes from keel's last checkpoint and ends with the model of an uninterrupted run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import OFFLINE, TINY_RECIPE, keel, write_toy_csv

pytestmark = pytest.mark.slow  # a Ray cluster and two training runs

ray = pytest.importorskip("ray.train.torch", reason="Ray Train is not installed (pip install 'ray[train]')")
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head node of this test's own (its own ports, temp folder and session: stopped by process group)."""
    temp = tmp_path_factory.mktemp("ray")
    port = _free_port()
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)  # keel in the workers
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--num-cpus", "2"]
    cmd += ["--node-ip-address", "127.0.0.1", "--port", str(port), "--temp-dir", str(temp), "--disable-usage-stats"]
    cmd += ["--include-dashboard", "false", "--ray-client-server-port", str(_free_port())]
    cmd += ["--node-manager-port", str(_free_port()), "--object-manager-port", str(_free_port())]
    cmd += ["--dashboard-agent-listen-port", str(_free_port())]  # not the default ports another cluster may hold
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 90
    up = False
    while time.time() < deadline and head.poll() is None:
        probe = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address='{address}', logging_level='ERROR'); ray.shutdown()"],
            env=env,
            capture_output=True,
            timeout=60,
        )
        if probe.returncode == 0:
            up = True
            break
        time.sleep(1)
    if not up:
        os.killpg(head.pid, signal.SIGKILL)
        output = head.stdout.read().decode(errors="replace").strip().splitlines() if head.poll() is not None else []
        pytest.skip(f"Ray cannot start a local cluster here ({output[-1] if output else 'no answer in 90 s'})")
    yield address, head.pid
    os.killpg(head.pid, signal.SIGTERM)  # the head and everything it started: this session only
    try:
        head.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _curve(run_dir):
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "split" not in r]


def _train_workers(session: int) -> list:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if os.getsid(p.pid) == session and "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def test_a_killed_ray_worker_resumes_to_the_uninterrupted_model(tmp_path, cluster):
    from safetensors.torch import load_file

    address, session = cluster
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE.format(data=write_toy_csv(tmp_path / "toy.csv"), epochs=2, every=2))
    settings = ["train.num_threads=1", "train.parallel.ray.max_failures=2"]
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    ref = keel("train", str(recipe), "--ray", address, "output.dir=runs/reference", *settings, cwd=tmp_path, env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = _curve(tmp_path / "runs/reference")
    assert [s for s, _ in expected] == list(range(1, 11))  # 2 workers: 5 steps per epoch, as under torchrun

    proc = subprocess.Popen(
        [sys.executable, "-m", "keel", "train", str(recipe), "--ray", address, "output.dir=runs/killed", *settings],
        cwd=tmp_path,
        env={**os.environ, **OFFLINE, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics, killed = tmp_path / "runs/killed/metrics.jsonl", None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and killed is None:
        steps = metrics.read_text().count('"loss"') if metrics.exists() else 0
        if steps >= 3:  # past the checkpoint of step 2, before the end
            workers = _train_workers(session)
            if workers:
                killed = workers[-1]
                killed.send_signal(signal.SIGKILL)
        time.sleep(0.02)
    assert killed is not None, "the run ended before a worker could be killed"
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    assert "resuming from step-" in output  # the restarted workers continued keel's last checkpoint
    assert _curve(tmp_path / "runs/killed") == expected
    a = load_file(str(tmp_path / "runs/reference/model/model.safetensors"))
    b = load_file(str(tmp_path / "runs/killed/model/model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # keel's checkpoints were reported to Ray as they were written (its storage holds keel's own folders)
    reported = list((tmp_path / "runs/.ray").rglob("step-*/manifest.json"))
    assert reported, "no keel checkpoint reached Ray's storage"
