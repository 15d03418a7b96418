"""keel from Python: the same recipes, runs and checks as the `keel` command, as functions and one class.

    import keel

    recipe = keel.load_recipe("tiny", train__epochs=1)    # a built-in name or a .yaml file, plus overrides
    keel.validate(recipe)                                 # what `keel validate` checks: files, columns, names
    run = keel.run(recipe)                                # train, evaluate on the test split, write report.html
    run.metrics["accuracy"], run.report_path
    run.predict(["what a lovely ride"])                   # [{"text", "label", "score", "scores"}]
    run = keel.load("runs/tiny")                          # a finished run directory, later

Overrides, wherever a recipe is loaded: ``section__field=value`` keywords (a double underscore between the levels,
as scikit-learn's ``set_params``), a mapping of ``"section.field"`` keys to values, or a list of
``"section.field=value"`` strings exactly as on the command line (values parsed as YAML there). Python values are
taken as they are: ``data__path=Path("my.csv")``, ``train__lr=1e-4``.

Every bad input raises a ``keel.errors.KeelError`` (``RecipeError``, ``DataError``, ``CheckpointError``,
``GateError``) with the line the CLI prints; nothing here exits the interpreter. Each method calls the code behind
the matching CLI verb (keel.pipeline, keel.evaluate, keel.trust.explain, keel.export.onnx, keel.serve.server).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keel.errors import KeelError
from keel.io import read_json

if TYPE_CHECKING:
    from keel.recipe import Recipe
    from keel.runtime.load import Trained
    from keel.trust.explain import Explanation

Overrides = Iterable[str] | Mapping[str, Any] | None
"""``["train.epochs=1", ...]`` as on the command line, or ``{"train.epochs": 1, ...}``."""

__all__ = ["Run", "load", "load_recipe", "run", "validate"]


def offline_defaults() -> None:
    """For the CLI and the API alike: models and data come from disk, never from the hub (``setdefault``: settings
    the caller made win)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _default_logging() -> None:
    """keel's progress lines on stderr, as the CLI prints them, unless the user configured the "keel" logger
    (handlers of their own, or a level: ``logging.getLogger("keel").setLevel(logging.WARNING)`` silences them)."""
    from keel.progress import setup_logging

    setup_logging(unless_configured=True)


def override_strings(overrides: Overrides = None, **kwargs: Any) -> list[str]:
    """All three override forms as the CLI's ``key.path=value`` strings. A Python value is written as YAML (flow
    style), so it reads back as the same value: ``"yes"`` stays a string, ``None`` is null, ``3`` an int."""
    import yaml

    if isinstance(overrides, (str, bytes)):
        raise KeelError(
            f"overrides must be a list of key.path=value strings or a mapping; got the string "
            f"{overrides!r}: wrap it in a list, e.g. [{overrides!r}]"
        )
    items: list[str] = []
    pairs: list[tuple[str, Any]] = []
    if isinstance(overrides, Mapping):
        pairs += [(str(k), v) for k, v in overrides.items()]
    elif overrides is not None:
        for item in overrides:
            if not isinstance(item, str):
                raise KeelError(f"override {item!r} is not a key.path=value string; for example 'train.lr=1e-4'")
            items.append(item)
    pairs += [(key.replace("__", "."), value) for key, value in kwargs.items()]
    for key, value in pairs:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        try:
            text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), allow_unicode=True).strip()
        except yaml.YAMLError:
            raise KeelError(
                f"override {key}: {type(value).__name__} is not a recipe value; pass a str, number, bool, "
                "None, list or dict"
            ) from None
        items.append(f"{key}={text.removesuffix('...').strip()}")
    return items


def load_recipe(spec: str | os.PathLike, overrides: Overrides = None, /, **kwargs: Any) -> Recipe:
    """Read and validate a recipe, as `keel validate` does before its file checks.

    Args:
        spec: a ``.yaml`` file, or the name of a built-in recipe (``keel ls``: ``quickstart``, ``tiny``, ...).
        overrides: ``["train.epochs=1"]`` (as on the command line) or ``{"train.epochs": 1}``.
        **kwargs: ``train__epochs=1``: the same overrides as keywords, a double underscore between levels.

    Raises:
        RecipeError: the file is missing or malformed, a key is unknown (with a "did you mean"), a value is invalid.
    """
    from keel.recipe import load_recipe as _load

    return _load(spec, override_strings(overrides, **kwargs))


def validate(
    recipe: Recipe | Mapping[str, Any] | str | os.PathLike, overrides: Overrides = None, /, **kwargs: Any
) -> Recipe:
    """Everything `keel validate` checks (types, names, files, columns), without loading a model; returns the
    recipe. ``recipe`` and the overrides as for ``run``.

    Raises:
        RecipeError, DataError: the first problem, with the line the CLI prints.
    """
    from keel.pipeline import check_recipe

    _default_logging()
    checked = _recipe(recipe, overrides, kwargs)
    check_recipe(checked)
    return checked


def _recipe(recipe: Recipe | Mapping[str, Any] | str | os.PathLike, overrides: Overrides, kwargs: dict) -> Recipe:
    from keel.recipe import Recipe, apply_override, validate_recipe

    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(recipe, overrides, **kwargs)
    if isinstance(recipe, Recipe):
        raw, source = recipe.model_dump(mode="json"), f"recipe '{recipe.name}'"
    elif isinstance(recipe, Mapping):
        import copy

        raw, source = copy.deepcopy(dict(recipe)), "recipe"
    else:
        raise KeelError(
            f"recipe must be a keel Recipe, a dict, a .yaml path or a built-in recipe name; got {type(recipe).__name__}"
        )
    items = override_strings(overrides, **kwargs)
    if isinstance(recipe, Recipe) and not items:
        return recipe
    for item in items:
        apply_override(raw, item)
    return validate_recipe(raw, source=source)


def run(
    recipe: Recipe | Mapping[str, Any] | str | os.PathLike,
    overrides: Overrides = None,
    /,
    *,
    resume: bool = False,
    **kwargs: Any,
) -> Run:
    """Everything the recipe asks for, as `keel run`: train, evaluate on the test split, audit and compress when the
    recipe says so, write report.html. Runs in the current directory's ``runs/<name>`` (or ``output.dir``).

    Args:
        recipe: a ``Recipe`` (from ``load_recipe``), a dict of the recipe's sections (what the YAML would hold),
            a ``.yaml`` path or a built-in recipe name.
        overrides, **kwargs: as for ``load_recipe``; applied to a ``Recipe`` too (it is not modified).
        resume: continue the run this recipe started last, from its last complete checkpoint.

    Raises:
        RecipeError, DataError: checked before a run directory is made, so nothing is left behind.
        GateError: an audit gate failed; the run directory and its report are written first (``keel.load`` it:
            ``runs/<name>`` as printed).
    """
    from keel.pipeline import full_run

    offline_defaults()
    _default_logging()
    return Run(full_run(_recipe(recipe, overrides, kwargs), resume=resume))


def load(run_dir: str | os.PathLike) -> Run:
    """A run directory that `keel run` (or ``keel.run``) made, to predict, evaluate, explain, export or serve.

    Raises:
        KeelError: ``run_dir`` is not a folder, or holds no run (no run.json or recipe.yaml).
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise KeelError(f"run directory '{path}' not found; pass the folder `keel run` printed (see runs/)")
    if not (path / "run.json").is_file() and not (path / "recipe.yaml").is_file():
        raise KeelError(
            f"'{path}' holds no keel run (no run.json, no recipe.yaml); pass the folder `keel run` printed (see runs/)"
        )
    return Run(path)


class Run:
    """One run directory (see keel/pipeline.py for its layout). Models are loaded on first use, their files
    checked against their manifests first, and kept for the next call (one per backend).

    Attributes:
        dir: the run directory, as an absolute path (a later ``os.chdir`` does not lose it).
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.dir = Path(run_dir).absolute()
        self._loaded: dict[str, Trained] = {}

    def __repr__(self) -> str:
        return f"keel.Run({str(self.dir)!r})"

    def __fspath__(self) -> str:
        return str(self.dir)

    # -- what the run wrote ---------------------------------------------------------------------------------

    @property
    def recipe(self) -> Recipe:
        """The run's resolved recipe (its recipe.yaml, read again on every access)."""
        from keel.recipe import load_recipe as _load

        return _load(self.dir / "recipe.yaml")

    @property
    def info(self) -> dict:
        """run.json: status, recipe hash, keel version, timings ({} if missing)."""
        return read_json(self.dir / "run.json")

    @property
    def task(self) -> str:
        """``classification`` or ``causal-lm``."""
        return self.info.get("task") or self.recipe.task

    @property
    def metrics(self) -> dict:
        """The test-split metrics (eval/test.json: accuracy, macro_f1, baseline, ... or loss, perplexity);
        {} when the run has no test evaluation (``data.split.test: 0``, or trained only)."""
        return read_json(self.dir / "eval" / "test.json")

    @property
    def report_path(self) -> Path:
        """report.html (written by ``keel.run``; ``keel report RUN_DIR`` rebuilds it)."""
        return self.dir / "report.html"

    # -- using the model ------------------------------------------------------------------------------------

    def _trained(self, backend: str) -> Trained:
        if backend not in self._loaded:
            from keel.runtime.load import load_trained

            offline_defaults()
            _default_logging()
            self._loaded[backend] = load_trained(self.dir, backend)
        return self._loaded[backend]

    def predict(self, texts: list[str], *, backend: str = "torch", batch_size: int = 32) -> list[dict]:
        """Label and class probabilities per text, as `keel predict --json`: ``{"text", "label", "score",
        "scores"}`` (and ``"mitigation"`` when the audit's thresholds apply).

        Args:
            backend: ``torch``, ``onnx`` / ``onnx-int8`` (after ``export``) or a compressed variant
                (``student-onnx-int8``, ...; see `keel bench`).
        Raises:
            KeelError: not a classification run, or the backend's model is missing.
        """
        from keel.evaluate import predict

        return predict(self.dir, _texts(texts), batch_size=batch_size, backend=backend, trained=self._trained(backend))

    def evaluate(
        self,
        data: str | os.PathLike | None = None,
        *,
        text_column: str | None = None,
        label_column: str | None = None,
        backend: str = "torch",
    ) -> dict:
        """Metrics on the run's test split, or on a labelled CSV/JSONL/Parquet file, as `keel eval --json`; the
        result is also written to eval/<split or file stem>.json.

        Args:
            data: a labelled file (default: the test split frozen at training time).
            text_column, label_column: the file's column names (default: the recipe's).
        """
        from keel.evaluate import evaluate_run

        columns = {k: v for k, v in (("text", text_column), ("label", label_column)) if v}
        if columns and data is None:
            raise KeelError("--text-column/--label-column go with --data FILE")
        offline_defaults()
        _default_logging()
        return evaluate_run(self.dir, os.fspath(data) if data is not None else None, columns, backend)

    def explain(self, texts: list[str], *, steps: int = 32) -> list[Explanation]:
        """Integrated-gradients token attributions, as `keel explain`: one ``Explanation`` per text (``tokens``,
        ``attributions`` toward ``label``, ``score``, ``delta``: the completeness gap); ``.to_json()`` for a dict."""
        from keel.trust.explain import explain_trained

        return list(explain_trained(self._trained("torch"), _texts(texts), n_steps=steps))

    def export(self, *, int8: bool = True, target: str = "onnx") -> dict:
        """ONNX export checked against PyTorch and, by default, int8 for ONNX Runtime, as `keel export`. Returns
        the figures by variant (``{"onnx": {"bytes", "max_abs_diff_vs_eager", ...}, "onnx-int8": {...}}``); the
        models land in export/onnx/ and export/onnx-int8/, usable as ``backend=`` of ``predict`` and ``evaluate``.
        ``target="web"`` writes export/web/ (Transformers.js layout and a demo page), ``"mobile"`` export/mobile/
        (ORT format); their figures come back with the folder under ``"folder"``."""
        offline_defaults()
        _default_logging()
        if target == "web":
            from keel.export.web import export_web

            return export_web(self.dir)
        if target == "mobile":
            from keel.export.mobile import export_mobile

            return export_mobile(self.dir)
        if target != "onnx":
            raise KeelError(f"target must be one of onnx, web, mobile; got {target!r}")
        from keel.export.onnx import export_onnx

        return export_onnx(self.dir, int8=int8)

    def serve(
        self,
        *,
        api_key_file: str | None = None,
        allow_no_auth: bool = False,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        device: str | None = None,
        **options: Any,
    ) -> None:
        """Serve the model behind keel's OpenAI-compatible HTTP API, as `keel serve RUN_DIR`. Blocks until SIGTERM
        or Ctrl-C (run it in its own process to keep working, e.g. ``multiprocessing.Process``).

        Args:
            **options: fields of the recipe's ``serve:`` section over the run's own: ``host``, ``port`` (0: any free
                port), ``backend``, ``max_batch_size``, ...
            api_key_file: one API key per line (or set KEEL_API_KEYS); without keys only a loopback host is served
                unless ``allow_no_auth``.
        Raises:
            KeelError: an unknown or invalid option, a non-loopback host without keys, half a TLS pair.
        """
        from keel.serve.server import serve, serve_config

        offline_defaults()
        _default_logging()
        config = serve_config(str(self.dir), None, [f"serve.{item}" for item in override_strings(options)])
        serve(str(self.dir), config, api_key_file, allow_no_auth, ssl_certfile, ssl_keyfile, device)

    def generate(self, prompts: list[str], *, max_new_tokens: int = 64) -> list[str]:
        """Greedy continuations of raw prompts (no chat template) by a causal-LM run's model (pretraining, SFT,
        alignment): one string per prompt, without the prompt. For chat, sampling and streaming use ``serve``."""
        from keel.align.evaluate import generate

        if max_new_tokens < 1:
            raise KeelError(f"max_new_tokens must be at least 1; got {max_new_tokens}")
        if (self.dir / "adapter").is_dir() and not (self.dir / "model").is_dir():
            raise KeelError(
                f"{self.dir} ends with a LoRA adapter (adapter/), not a model; set sft.merge=true for a merged model/"
            )
        trained = self._trained("torch")
        if trained.info["task"] != "causal-lm":
            raise KeelError(
                f"generate works on causal-lm runs; {self.dir} is a {trained.info['task']} run (use predict)"
            )
        return generate(trained.model, trained.tokenizer, _texts(prompts), max_new_tokens)


def _texts(texts: Any) -> list[str]:
    if isinstance(texts, str):
        raise KeelError(f"pass a list of texts, e.g. [{texts[:40]!r}]; got one string")
    texts = list(texts)
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise KeelError(f"every text must be a str; got {type(bad).__name__} {bad!r:.60}")
    return texts
