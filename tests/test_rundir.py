"""The run directory's lifecycle as every trainer gets it from keel/pipeline.py, and the import graph's layers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from keel import pipeline, rundir
from keel.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
GRAPH = ROOT / "benchmarks" / "import_graph.py"


def graph(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GRAPH), *args], capture_output=True, text=True, timeout=120)


def test_keel_has_no_import_cycle():
    proc = graph()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "modules, " in proc.stdout and "packages, " in proc.stdout
    assert proc.stdout.count("0 cycle(s)") == 2  # neither modules nor packages import each other in a circle


def test_import_graph_finds_a_package_cycle_between_acyclic_modules(tmp_path):
    pkg = tmp_path / "keel"
    for sub in ("a", "b"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "low.py").write_text("")
    (pkg / "a" / "high.py").write_text("from keel.b import mid\n")
    (pkg / "b" / "mid.py").write_text("def f():\n    from keel.a import low\n")  # modules: high -> mid -> low, no cycle
    proc = graph("--root", str(tmp_path))
    assert proc.returncode == 1, proc.stdout
    assert "0 cycle(s)" in proc.stdout.splitlines()[0]  # the module view is clean
    assert "package cycle: keel.a <-> keel.b" in proc.stdout
    assert "keel.a.high -> keel.b.mid" in proc.stdout and "keel.b.mid -> keel.a.low" in proc.stdout


def test_import_graph_finds_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "keel"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from keel.sub import high\n    return high\n")  # the hidden edge
    (pkg / "sub" / "high.py").write_text("from keel import low\n")
    (pkg / "alone.py").write_text("import keel.low\n")
    proc = graph("--root", str(tmp_path))
    assert proc.returncode == 1
    assert "cycle: keel.low <-> keel.sub.high" in proc.stdout and "alone" not in proc.stdout.split("cycle:", 1)[1]


class FakeTrainer:
    """A trainer that records the calls the dispatcher makes and fails where it is told to."""

    resumable = True
    calls: list[str] = []
    fail_in: str | None = None
    error: type[BaseException] = RuntimeError

    def __init__(self, recipe, resume=False):
        self.calls.append("init")

    def _step(self, name):
        self.calls.append(name)
        if self.fail_in == name:
            raise self.error(f"broke in {name}")

    def setup(self, run_dir):
        self.run_dir = run_dir
        self._step("setup")

    def train(self):
        assert (self.run_dir / rundir.LOCK).is_file()  # the run's writer lock is held while it trains
        self._step("train")

    def save(self):
        self._step("save")
        return {"steps": 3}

    def cleanup(self):
        self.calls.append("cleanup")


@pytest.fixture
def fake(monkeypatch, tiny_recipe, tmp_path):
    monkeypatch.chdir(tmp_path)
    FakeTrainer.calls, FakeTrainer.fail_in, FakeTrainer.error = [], None, RuntimeError
    monkeypatch.setitem(pipeline.TRAINERS, "fake", lambda: FakeTrainer)
    monkeypatch.setitem(pipeline.AFTER, "fake", lambda recipe, run: FakeTrainer.calls.append("after"))
    return load_recipe(tiny_recipe())


def run_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def test_dispatcher_drives_a_trainer_through_the_lifecycle(fake):
    run_dir = pipeline.execute(fake, False, "fake")
    assert FakeTrainer.calls == ["init", "setup", "train", "save", "cleanup", "after"]
    info = run_json(run_dir)
    assert info["status"] == "finished" and info["train"] == {"steps": 3} and "wall_seconds" in info
    assert (run_dir / "recipe.yaml").is_file() and not (run_dir / rundir.LOCK).exists()
    assert rundir.resolve(fake, resume=True) == run_dir  # what --resume continues
    FakeTrainer.calls = []
    assert pipeline.execute(fake, False, "fake", full=False).name == "tiny-2"  # never over an earlier run
    assert FakeTrainer.calls[-1] == "cleanup" and run_json(run_dir.parent / "tiny-2")["status"] == "trained"


@pytest.mark.parametrize("where,error", [("setup", RuntimeError), ("train", KeyboardInterrupt), ("save", OSError)])
def test_any_error_marks_the_run_failed_and_frees_it(fake, where, error):
    FakeTrainer.fail_in, FakeTrainer.error = where, error
    with pytest.raises(error):
        pipeline.execute(fake, False, "fake")
    run_dir = Path("runs") / "tiny"
    info = run_json(run_dir)
    assert info["status"] == "failed" and info["error"] == f"{error.__name__}: broke in {where}"
    assert FakeTrainer.calls[-1] == "cleanup" and "after" not in FakeTrainer.calls
    assert not (run_dir / rundir.LOCK).exists()  # the next process may write to it (e.g. --resume)


def test_a_failure_the_run_recorded_itself_is_kept(fake, monkeypatch):
    def gate(recipe, run):
        run.fail("gate x failed", status="gate failed")
        raise RuntimeError("gate x failed")

    monkeypatch.setitem(pipeline.AFTER, "fake", gate)
    with pytest.raises(RuntimeError):
        pipeline.execute(fake, False, "fake")
    info = run_json(Path("runs") / "tiny")
    assert info["status"] == "gate failed" and info["error"] == "gate x failed"


def test_a_trainer_that_cannot_resume_says_so_before_any_folder(fake):
    FakeTrainer.resumable = False
    try:
        with pytest.raises(Exception, match="--resume is not supported"):
            pipeline.execute(fake, True, "fake")
    finally:
        FakeTrainer.resumable = True
    assert FakeTrainer.calls == [] and not Path("runs").exists()


def test_every_recipe_kind_has_a_trainer_and_its_stages():
    for kind in pipeline.TRAINERS:
        cls = pipeline.TRAINERS[kind]()
        assert all(callable(getattr(cls, m, None)) for m in ("setup", "train", "save", "cleanup")), kind
        assert isinstance(cls.resumable, bool) and kind in pipeline.AFTER
