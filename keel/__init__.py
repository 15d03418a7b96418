"""keel: from a data set to a trained, evaluated, compressed, explained and served transformer.

The Python API (keel/api.py) is loaded on first use, so ``import keel`` imports neither torch nor transformers:

    import keel

    run = keel.run(keel.load_recipe("tiny", train__epochs=1))
    run.predict(["what a lovely ride"])
"""

import logging as _logging

from keel._version import __version__

# torchao, once installed, is imported by transformers and narrates at import time (optional CUDA kernels it
# cannot load on a CPU, deprecation notes from torch's pytree): nothing a keel user can act on.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
# A library's loggers stay silent until the application configures logging (the CLI and keel.api do, unless the
# user gave the "keel" logger handlers of their own).
_logging.getLogger("keel").addHandler(_logging.NullHandler())

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; type checkers read it the same
if TYPE_CHECKING:
    from keel.api import Run, load, load_recipe, run, validate
    from keel.errors import (
        CheckpointError,
        DataError,
        GateError,
        KeelError,
        RecipeError,
    )

_LAZY = {
    "Run": "keel.api",
    "load": "keel.api",
    "load_recipe": "keel.api",
    "run": "keel.api",
    "validate": "keel.api",
    "KeelError": "keel.errors",
    "RecipeError": "keel.errors",
    "DataError": "keel.errors",
    "CheckpointError": "keel.errors",
    "GateError": "keel.errors",
}
__all__ = [
    "CheckpointError",
    "DataError",
    "GateError",
    "KeelError",
    "RecipeError",
    "Run",
    "__version__",
    "load",
    "load_recipe",
    "run",
    "validate",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'keel' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
