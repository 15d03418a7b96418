"""Where llama.cpp's own tools are: the HF -> GGUF converter (Python) and llama-cpp-python (the quantizer, the runtime).

Both come from the ``llama-cpp-python`` sdist, which vendors llama.cpp. ``make llama`` installs llama-cpp-python
(compiled once; requirements-llama.txt) and unpacks the converter (``convert_hf_to_gguf.py`` and its
``conversion/`` package, with the ``gguf-py`` it is written against) beside the environment; ``make llama-src`` does the second step alone (no compiler):

    python -m keel.export.llama_tools unpack llama_cpp_python-X.Y.Z.tar.gz

The converter lives in ``$KEEL_LLAMA_CPP_SRC`` or else ``<sys.prefix>/share/keel-llama.cpp``. It runs with its own
``gguf-py`` (newer than the released ``gguf`` package of the same version number); keel reads GGUF files with the
installed ``gguf`` package.
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
from pathlib import Path

from keel.errors import KeelError

SRC_ENV = "KEEL_LLAMA_CPP_SRC"
HOW = "run `make llama` (llama-cpp-python, compiled once, and llama.cpp's converter)"


def converter_dir() -> Path:
    """The folder with ``convert_hf_to_gguf.py`` and ``conversion/`` (it may not exist)."""
    env = os.environ.get(SRC_ENV)
    return Path(env) if env else Path(sys.prefix) / "share" / "keel-llama.cpp"


def has_converter() -> bool:
    d = converter_dir()
    return all(
        (d / p).is_file() for p in ("convert_hf_to_gguf.py", "conversion/__init__.py", "gguf-py/gguf/__init__.py")
    )


def require_converter() -> Path:
    if not has_converter():
        raise KeelError(f"keel export --target gguf needs llama.cpp's converter, not found in {converter_dir()}; {HOW}")
    return converter_dir()


def has_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def llama_cpp(what: str = "keel export --target gguf"):
    """The ``llama_cpp`` module, or one line naming the make target that installs it."""
    try:
        import llama_cpp as module
    except ImportError as e:  # missing, or its compiled library cannot load
        raise KeelError(f"{what} needs llama-cpp-python ({e}); {HOW}") from None
    return module


def unpack(sdist: Path, dest: Path | None = None) -> Path:
    """Copy the converter out of a llama-cpp-python sdist into ``dest`` (default: ``converter_dir()``), atomically."""
    dest = Path(dest) if dest else converter_dir()
    prefix = None
    tmp = dest.parent / f".tmp-{dest.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if "vendor" not in parts:
                continue
            at = parts.index("vendor")
            rel = Path(*parts[at + 2 :]) if len(parts) > at + 2 and parts[at + 1] == "llama.cpp" else None
            if rel is None or not (
                rel.as_posix() in ("convert_hf_to_gguf.py", "LICENSE")
                or rel.parts[0] == "conversion"
                or rel.parts[:2] == ("gguf-py", "gguf")
            ):
                continue
            if not member.isfile() or ".." in rel.parts:
                continue
            prefix = prefix or Path(*parts[: at + 2])
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    if not (tmp / "convert_hf_to_gguf.py").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise KeelError(f"{sdist} holds no vendor/llama.cpp/convert_hf_to_gguf.py; pass a llama-cpp-python sdist")
    (tmp / "SOURCE").write_text(f"{Path(sdist).name}\n")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "unpack":
        print("usage: python -m keel.export.llama_tools unpack LLAMA_CPP_PYTHON_SDIST.tar.gz", file=sys.stderr)
        return 2
    try:
        print(f"llama.cpp's converter unpacked into {unpack(Path(argv[1]))}")
    except (KeelError, OSError, tarfile.TarError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
