"""The `keel` command. Heavy libraries are imported inside each verb, so `keel validate` stays fast.

Exit codes: 0 ok, 2 bad input (one line, no traceback unless --debug), 3 a quality gate failed,
1 an unexpected error.
"""

from __future__ import annotations

import json
import math
import sys

import typer

from keel.api import offline_defaults
from keel.errors import KeelError
from keel.progress import console, esc, out, safe_print

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="keel: from a data set to a trained, evaluated transformer. Start with `keel quickstart`.",
)
_state = {"debug": False}

RECIPE = typer.Argument(..., help="a recipe .yaml file, or the name of a built-in recipe (see `keel ls`)")
OVERRIDES = typer.Argument(None, help="key.path=value overrides, e.g. train.lr=1e-4 data.max_train_samples=500")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show full tracebacks")) -> None:
    _state["debug"] = debug
    offline_defaults()
    import logging

    from keel.progress import setup_logging

    setup_logging(debug)
    # one handler prints each line: a library's logging.basicConfig() during a verb (ONNX Runtime's quantizer calls
    # it) must not print keel's lines a second time through the root logger
    logging.getLogger("keel").propagate = False


@app.command()
def validate(recipe: str = RECIPE, overrides: list[str] | None = OVERRIDES) -> None:
    """Check a recipe (types, names, files, columns) without loading any model."""
    from keel.pipeline import check_recipe
    from keel.recipe import load_recipe

    r = load_recipe(recipe, overrides)
    check_recipe(r)
    out.print(
        f"[green]ok[/] {esc(recipe)}: task {r.task}, model {esc(r.model.name)}, data {esc(r.data.name or r.data.path)}, "
        f"sha256 {r.sha256()[:12]}"
    )


@app.command()
def run(
    recipe: str = RECIPE,
    overrides: list[str] | None = OVERRIDES,
    resume: bool = typer.Option(False, "--resume", help="continue from the last complete checkpoint"),
) -> None:
    """Everything the recipe asks for: train, evaluate on the test split, write report.html."""
    from keel.pipeline import full_run

    r = _load(recipe, overrides)
    run_dir = full_run(r, resume=resume)
    _print_results(run_dir)


@app.command()
def train(
    recipe: str = RECIPE,
    overrides: list[str] | None = OVERRIDES,
    resume: bool = typer.Option(False, "--resume", help="continue from the last complete checkpoint"),
) -> None:
    """Train only; the model lands in RUN_DIR/model."""
    from keel.pipeline import train_run

    r = _load(recipe, overrides)
    run_dir = train_run(r, resume=resume)
    from keel.progress import is_main_process

    if is_main_process():
        out.print(f"trained: [bold]{esc(run_dir)}[/]   next: keel eval {esc(run_dir)}")


@app.command("eval")
def eval_(
    run_dir: str = typer.Argument(..., help="a run directory"),
    data: str | None = typer.Option(
        None,
        "--data",
        help="a labelled CSV/JSONL/Parquet file; for causal-lm runs a "
        "file in the run's own format (text, chats, or preference pairs)",
    ),
    text_column: str | None = typer.Option(None, help="text column of --data (default: the recipe's)"),
    label_column: str | None = typer.Option(None, help="label column of --data (default: the recipe's)"),
    backend: str = typer.Option(
        "torch",
        help="torch, onnx, onnx-int8 (after `keel export`) or a compressed variant such as pruned-onnx-int8 (see `keel bench`)",
    ),
    as_json: bool = typer.Option(False, "--json", help="print the metrics as JSON"),
) -> None:
    """Evaluate a run's model on its test split, or on a file (labelled texts; text, chats or pairs for causal LMs)."""
    from keel.evaluate import evaluate_run

    columns = {k: v for k, v in (("text", text_column), ("label", label_column)) if v}
    if columns and not data:
        raise KeelError("--text-column/--label-column go with --data FILE")
    result = evaluate_run(run_dir, data, columns, backend)
    if as_json:
        out.print_json(json.dumps(result))
        return
    _print_eval(result)


@app.command()
def predict(
    run_dir: str = typer.Argument(..., help="a run directory"),
    texts: list[str] = typer.Argument(..., help="texts to classify; a single - reads one text per line from stdin"),
    backend: str = typer.Option(
        "torch",
        help="torch, onnx, onnx-int8 (after `keel export`) or a compressed variant such as pruned-onnx-int8 (see `keel bench`)",
    ),
    as_json: bool = typer.Option(False, "--json", help="print JSON lines"),
) -> None:
    """Classify texts with a run's model."""
    from rich.table import Table

    from keel.evaluate import predict as _predict

    if texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
        if not texts:
            raise KeelError("predict: no text on stdin; pipe one text per line, or pass texts as arguments")
    results = _predict(run_dir, texts, backend=backend)
    if as_json:
        for r in results:
            print(json.dumps(r))
        return
    from rich.text import Text

    table = Table("text", "label", "score")
    for r in results:  # Text cells: texts and labels are printed as typed, never parsed as markup
        table.add_row(Text(r["text"][:80]), Text(r["label"]), f"{r['score']:.3f}")
    out.print(table)


@app.command()
def export(
    run_dir: str = typer.Argument(..., help="a run directory"),
    int8: bool = typer.Option(True, "--int8/--no-int8", help="also write an int8 ONNX Runtime model"),
) -> None:
    """Export a classifier to ONNX (checked against PyTorch) and, by default, int8 for ONNX Runtime."""
    from keel.export.onnx import FP32, INT8, export_dir, export_onnx

    result = export_onnx(run_dir, int8=int8)
    out.print(
        f"{esc(export_dir(run_dir, FP32))}: {result[FP32]['bytes'] / 1e6:.1f} MB, "
        f"max |logit diff| vs PyTorch {result[FP32]['max_abs_diff_vs_eager']:.1e}"
    )
    if INT8 in result:
        out.print(
            f"{esc(export_dir(run_dir, INT8))}: {result[INT8]['bytes'] / 1e6:.1f} MB, "
            f"logit cosine vs PyTorch {result[INT8]['logit_cosine_vs_eager']:.4f}"
        )
    out.print(f"next: keel eval {esc(run_dir)} --backend onnx-int8")


@app.command()
def bench(
    run_dir: str = typer.Argument(..., help="a run directory"),
    n_latency: int = typer.Option(100, help="texts timed one by one for the batch-1 latency"),
    n_eval: int = typer.Option(1000, help="test examples scored (and timed at batch 32)"),
    rounds: int = typer.Option(1, min=1, max=10, help="measure every variant this many times, keep its best timings"),
) -> None:
    """Measure every variant of a run's model (HF pipeline baseline, PyTorch, ONNX, int8, compressed) side by side."""
    from keel.export.bench import bench as _bench
    from keel.report import write_report

    _print_bench(_bench(run_dir, n_latency, n_eval, rounds=rounds))
    out.print(
        f"ratios vs the fp32 teacher through transformers' pipeline; wrote {esc(run_dir)}/bench.json and "
        f"{esc(write_report(run_dir))}"
    )


# -- compression: each stage alone, or all of them with the budgeted pick ---------------------------

COMPRESS_OVERRIDES = typer.Argument(
    None, help="compress.* overrides, e.g. compress.distill.layers=3 compress.prune.ffn=0.5"
)


@app.command()
def distill(
    run_dir: str = typer.Argument(..., help="a run directory (its model is the teacher)"),
    overrides: list[str] | None = COMPRESS_OVERRIDES,
) -> None:
    """Distill the run's model into a smaller student (RUN_DIR/compress/student)."""
    from keel.compress.stages import distill as _distill
    from keel.compress.stages import run_recipe

    folder = _distill(run_dir, run_recipe(run_dir, overrides))
    out.print(f"student: [bold]{esc(folder)}[/]   next: keel eval {esc(run_dir)} --backend student-torch")


@app.command()
def prune(
    run_dir: str = typer.Argument(..., help="a run directory"), overrides: list[str] | None = COMPRESS_OVERRIDES
) -> None:
    """Prune the latest model (student, else teacher): heads/FFN neurons (structured) or weights (sparsity)."""
    from keel.compress.stages import prune as _prune
    from keel.compress.stages import run_recipe

    folder = _prune(run_dir, run_recipe(run_dir, overrides))
    out.print(f"pruned: [bold]{esc(folder)}[/]   next: keel eval {esc(run_dir)} --backend pruned-torch")


@app.command()
def quantize(
    run_dir: str = typer.Argument(..., help="a run directory"),
    overrides: list[str] | None = COMPRESS_OVERRIDES,
    stage: str | None = typer.Option(None, help="teacher, student or pruned (default: the latest)"),
) -> None:
    """ONNX export + int8 (dynamic, and static when asked) of the latest model; torchao int8 when asked."""
    from keel.compress.stages import quantize as _quantize
    from keel.compress.stages import run_recipe

    for variant in _quantize(run_dir, run_recipe(run_dir, overrides), stage):
        out.print(f"  {variant}   (keel eval {esc(run_dir)} --backend {variant})")


@app.command()
def compress(
    run_dir: str = typer.Argument(..., help="a run directory"), overrides: list[str] | None = COMPRESS_OVERRIDES
) -> None:
    """Every stage in the recipe's compress section, the bench, and the deployable pick within compress.budget."""
    from keel.compress.stages import compress as _compress
    from keel.report import write_report

    try:
        record = _compress(run_dir, overrides)
    finally:
        from pathlib import Path

        if (Path(run_dir) / "bench.json").is_file():
            import json as _json

            _print_bench(_json.loads((Path(run_dir) / "bench.json").read_text()))
            write_report(run_dir)
    out.print(
        f'deployable: [bold]{record["deployable"]}[/]   (keel predict {esc(run_dir)} --backend {record["deployable"]} "...")'
    )


def _print_bench(result: dict) -> None:
    from rich.table import Column, Table

    names = [r["variant"] for r in result["variants"]]
    split = result.get("split", "test")  # benches written before the validation pick scored the test split
    table = Table(
        Column("variant", no_wrap=True, min_width=max(map(len, names))),
        f"{split} accuracy",
        "macro-F1",
        "MB on disk",
        "p50 ms (b=1)",
        "p95 ms (b=1)",
        "samples/s (b=32)",
        "peak RSS MB",
        "x faster p50",
        "x throughput",
        "x throughput, length-sorted",
        "x smaller",
    )
    for r in result["variants"]:
        table.add_row(
            r["variant"],
            f"{r['accuracy']:.4f}",
            f"{r['macro_f1']:.4f}",
            f"{r['disk_mb']:.1f}",
            f"{r['p50_ms_batch1']:.2f}",
            f"{r['p95_ms_batch1']:.2f}",
            f"{r['throughput_batch32']:.1f}",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['speedup_p50_vs_pipeline']:.2f}",
            f"{r['throughput_vs_pipeline']:.2f}",
            f"{r.get('throughput_sorted_vs_pipeline', float('nan')):.2f}",
            f"{r['smaller_vs_pipeline']:.2f}",
        )
    out.print(table)
    out.print(
        "throughput: the same batches of 32 for every variant and the pipeline, in the split's order; "
        "length-sorted: the same batches of similar-length texts for all of them"
    )


@app.command()
def report(run_dir: str = typer.Argument(..., help="a run directory")) -> None:
    """(Re)build RUN_DIR/report.html from the files in the run directory."""
    from pathlib import Path

    from keel.report import write_report

    if not Path(run_dir).is_dir():
        raise KeelError(f"run directory '{run_dir}' not found")
    out.print(f"wrote {esc(write_report(run_dir))}")


@app.command(
    help="Federated learning with Flower. `keel federate RECIPE` simulates every site on this machine; "
    "`keel federate serve RECIPE` runs the server and `keel federate join RECIPE --site-data FILE "
    "--server HOST:PORT` one site, as separate processes."
)
def federate(
    args: list[str] = typer.Argument(..., metavar="[serve|join] RECIPE [key.path=value ...]"),
    resume: bool = typer.Option(False, "--resume", help="continue after the last completed round"),
    site_data: str | None = typer.Option(None, "--site-data", help="join: this site's labelled file"),
    server: str | None = typer.Option(None, "--server", help="join: the server's HOST:PORT"),
    site_name: str | None = typer.Option(
        None, "--site-name", help="join: the name the server logs (default: the file's name)"
    ),
    root_certificate: str | None = typer.Option(None, "--root-certificate", help="join: CA certificate (PEM) for TLS"),
    address: str | None = typer.Option(
        None, "--address", help="serve: HOST:PORT to listen on (default federated.server.address)"
    ),
    secret_file: str | None = typer.Option(
        None, "--secret-file", help="serve/join: file with the federation's site secret (or set KEEL_FEDERATION_SECRET)"
    ),
    allow_insecure: bool = typer.Option(
        False, "--allow-insecure", help="serve/join: plain gRPC on a non-loopback address"
    ),
    allow_no_auth: bool = typer.Option(
        False, "--allow-no-auth", help="serve: a non-loopback address without a site secret"
    ),
) -> None:
    mode = args[0] if args[0] in ("serve", "join") else "simulate"
    rest = args[1:] if mode != "simulate" else args
    if not rest:
        raise KeelError(f"keel federate {mode}: pass a recipe, e.g. keel federate {mode} federated")
    r = _load(rest[0], rest[1:])
    from keel.federated import run as fed_run

    if mode == "join":
        if not site_data or not server:
            raise KeelError("keel federate join needs --site-data FILE and --server HOST:PORT")
        fed_run.join(
            r,
            site_data,
            server,
            site_name,
            root_certificate,
            debug=_state["debug"],
            secret_file=secret_file,
            allow_insecure=allow_insecure,
        )
        return
    if site_data or server:
        raise KeelError("--site-data and --server go with `keel federate join`")
    from keel.pipeline import federate as run_federated

    if mode == "serve":
        run_dir = run_federated(
            r,
            "serve",
            resume=resume,
            address=address,
            debug=_state["debug"],
            secret_file=secret_file,
            allow_insecure=allow_insecure,
            allow_no_auth=allow_no_auth,
        )
    else:
        run_dir = run_federated(r, "simulate", resume=resume, debug=_state["debug"])
    _print_results(run_dir)


@app.command("ls")
def ls() -> None:
    """Built-in models, data sets and recipes."""
    from rich.table import Column, Table

    from keel.data.builtin import DATASETS
    from keel.models.registry import MODELS
    from keel.recipe import builtin_recipes

    t = Table(Column("model", no_wrap=True), "kind", "params", "from package", "description", title="models")
    for m in MODELS.values():
        t.add_row(m.name, m.kind, m.params, m.source, m.description)
    out.print(t)
    t = Table(Column("data set", no_wrap=True), "task", "license", "from package", "description", title="data sets")
    for d in DATASETS.values():
        t.add_row(d.name, d.task, d.license, d.package, d.description)
    out.print(t)
    t = Table("recipe", "file", title="recipes")
    for name, path in builtin_recipes().items():
        t.add_row(name, str(path))
    out.print(t)
    out.print(
        "any local Hugging Face model folder works as model.name; any CSV/JSONL/Parquet file as data.path; "
        "start your own recipe from one of these with keel init NAME"
    )


@app.command()
def init(name: str = typer.Argument("quickstart", help="the built-in recipe to start from (see `keel ls`)")) -> None:
    """Write NAME.yaml here: a commented copy of a built-in recipe to edit (an existing file is never replaced)."""
    from pathlib import Path

    from keel.recipe_fields import init_recipe

    path = init_recipe(name, Path.cwd())
    out.print(
        f"wrote {esc(path.name)} (from the built-in recipe '{esc(name)}')   next: edit it, then "
        f"keel validate {esc(path.name)} and keel run {esc(path.name)}; every field: keel recipe fields"
    )


recipe_app = typer.Typer(no_args_is_help=True, help="Recipe reference: `keel recipe fields [SECTION]`.")
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("fields")
def recipe_fields(
    section: str | None = typer.Argument(
        None, help="a section such as train, train.privacy or audit.fairness (default: every field)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the fields as JSON"),
) -> None:
    """Every recipe field with its type, default and description, read from the recipe schema itself."""
    from rich.table import Column, Table
    from rich.text import Text

    from keel.recipe_fields import section_fields

    rows = section_fields(section)
    if as_json:
        print(json.dumps([{k: v for k, v in r.items() if k != "section"} for r in rows], indent=1))
        return
    table = Table(Column("field", no_wrap=True), "type", "default", "description", title=section or "recipe fields")
    for r in rows:
        table.add_row(
            Text(r["path"], style="bold" if r["section"] else ""),
            Text(r["type"]),
            Text(r["default"]),
            Text(r["description"]),
        )
    out.print(table)


@app.command()
def quickstart(overrides: list[str] | None = OVERRIDES) -> None:
    """Fine-tune minilm-l6 on 2,400 tweets (about 4 minutes on 2 CPU cores), evaluate, write the report."""
    from keel.pipeline import full_run

    r = _load("quickstart", overrides)
    run_dir = full_run(r)
    _print_results(run_dir)


@app.command()
def serve(
    target: str = typer.Argument(..., help="a run directory, or a model name (keel ls) or local model folder"),
    recipe: str | None = typer.Option(
        None, "--recipe", help="take the serve: section from this recipe (default: the run directory's recipe.yaml)"
    ),
    overrides: list[str] | None = typer.Option(
        None, "--set", help="serve.key=value, e.g. --set serve.max_batch_size=64"
    ),
    host: str | None = typer.Option(None, help="bind address (serve.host; default 127.0.0.1)"),
    port: int | None = typer.Option(None, help="port (serve.port; default 8000; 0 = any free port)"),
    backend: str | None = typer.Option(
        None, help="auto (the deployable variant, else onnx-int8, onnx, torch) or a variant name (serve.backend)"
    ),
    api_key_file: str | None = typer.Option(None, help="file with one API key per line (or set KEEL_API_KEYS)"),
    allow_no_auth: bool = typer.Option(False, "--allow-no-auth", help="serve a non-loopback address without keys"),
    ssl_certfile: str | None = typer.Option(None, help="TLS certificate (PEM)"),
    ssl_keyfile: str | None = typer.Option(None, help="TLS private key (PEM)"),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when available)"),
) -> None:
    """Serve a model behind an OpenAI-compatible HTTP API (classify, embeddings, completions, chat)."""
    from keel.serve.server import serve as _serve
    from keel.serve.server import serve_config

    config = serve_config(target, recipe, overrides, host=host, port=port, backend=backend)
    _serve(target, config, api_key_file, allow_no_auth, ssl_certfile, ssl_keyfile, device)


# -- secure artifacts: encryption at rest, signatures (keel/secure) -------------------------------


@app.command()
def seal(
    run_dir: str = typer.Argument(None, help="a run directory (its model/ and export/ folders are sealed)"),
    key_file: str | None = typer.Option(None, help="file with the 32-byte key (or set KEEL_SEAL_KEY)"),
    new_key_file: str | None = typer.Option(
        None, help="rotate: re-seal a sealed run under this key (or KEEL_SEAL_NEW_KEY); the current one opens it"
    ),
    new_key: bool = typer.Option(False, "--new-key", help="print a fresh random key and exit"),
) -> None:
    """Encrypt a run's model and exports at rest (AES-256-GCM, chunked); serve/eval/predict open it with the key."""
    import time
    from pathlib import Path

    from keel.io import run_lock
    from keel.secure import seal as sealing

    if new_key:
        print(sealing.new_key())
        return
    if not run_dir:
        raise KeelError("keel seal: pass a run directory (or --new-key to print a fresh key)")
    if not Path(run_dir).is_dir():
        raise KeelError(f"run directory '{run_dir}' not found; pass the folder `keel run` printed (see runs/)")
    key = sealing.load_key(key_file)
    rotate = sealing.load_key(new_key_file, sealing.NEW_KEY_ENV, sealing.NEW_KEY_FILE_ENV, required=False)
    start = time.perf_counter()
    with run_lock(Path(run_dir)):
        done = sealing.seal_run(Path(run_dir), rotate or key, key if rotate else None)
    seconds = time.perf_counter() - start
    total = sum(d["bytes"] for d in done)
    print(
        f"{'re-sealed' if rotate else 'sealed'} {len(done)} folder(s), {total / 1e6:.1f} MB in {seconds:.1f} s "
        f"({total / 1e6 / max(seconds, 1e-9):.0f} MB/s): {', '.join(Path(d['folder']).name for d in done)}"
    )
    left = [p.name for p in (Path(run_dir) / "checkpoints", Path(run_dir) / "compress") if p.is_dir()]
    if left:
        print(f"note: not sealed, still plaintext weights: {', '.join(left)}/; delete them before shipping this run")


@app.command()
def unseal(
    run_dir: str = typer.Argument(..., help="a sealed run directory"),
    key_file: str | None = typer.Option(None, help="file with the 32-byte key (or set KEEL_SEAL_KEY)"),
) -> None:
    """Decrypt a sealed run's model and exports back to plain files."""
    from pathlib import Path

    from keel.io import run_lock
    from keel.secure import seal as sealing

    if not Path(run_dir).is_dir():
        raise KeelError(f"run directory '{run_dir}' not found; pass the folder `keel run` printed (see runs/)")
    key = sealing.load_key(key_file)
    with run_lock(Path(run_dir)):
        done = sealing.unseal_run(Path(run_dir), key)
    print(f"unsealed {len(done)} folder(s): {', '.join(Path(d['folder']).name for d in done)}")


@app.command()
def sign(
    run_dir: str = typer.Argument(..., help="a run directory"),
    key: str = typer.Option(..., "--key", help="EC private key (PEM) to sign with"),
) -> None:
    """Sign the run's model folders (OpenSSF model-signing bundles in RUN/signatures/, key-based, offline)."""
    from pathlib import Path

    from keel.secure.sign import sign_run

    if not Path(run_dir).is_dir():
        raise KeelError(f"run directory '{run_dir}' not found; pass the folder `keel run` printed (see runs/)")
    for sig in sign_run(run_dir, key):
        print(f"signed: {sig}")


@app.command()
def verify(
    run_dir: str = typer.Argument(..., help="a run directory"),
    key: str | None = typer.Option(None, "--key", help="EC public key (PEM): also check the signatures"),
) -> None:
    """Check a run: its model files against their manifests, the signatures (with --key) and the model card."""
    from pathlib import Path

    from keel.io import verify_manifest
    from keel.secure.seal import sealed_folders

    if not Path(run_dir).is_dir():
        raise KeelError(f"run directory '{run_dir}' not found; pass the folder `keel run` printed (see runs/)")
    folders = sealed_folders(Path(run_dir))
    if not folders:
        raise KeelError(f"{run_dir} has no model to verify (model/ with a manifest); train it first")
    for folder in folders:
        verify_manifest(folder)
    print(f"manifests: {len(folders)} folder(s) match")
    from keel.secure.sbom import check_card

    claims = check_card(Path(run_dir))
    print(f"model card: {claims} claim(s) match the files" if claims else "model card: no provenance claims to check")
    if key:
        from keel.secure.sign import verify_run

        verify_run(run_dir, key, folders)
        print(f"signatures: {len(folders)} folder(s) match {key}")


# -- trust: explanations and fairness audits (keel/trust) -----------------------------------------


@app.command()
def explain(
    run_dir: str = typer.Argument(..., help="a run directory"),
    texts: list[str] = typer.Argument(..., help="texts to explain; a single - reads one text per line from stdin"),
    steps: int = typer.Option(32, help="integrated-gradients steps"),
    as_json: bool = typer.Option(False, "--json", help="print JSON lines"),
) -> None:
    """Token attributions (integrated gradients): which words pushed the prediction, coloured in the terminal."""
    from keel.evaluate import load_trained
    from keel.trust.explain import explain_trained, render_terminal

    if texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
        if not texts:
            raise KeelError("explain: no text on stdin; pipe one text per line, or pass texts as arguments")
    if steps < 2:  # before the model is loaded
        raise KeelError(f"--steps must be at least 2; got {steps}")
    for e in explain_trained(load_trained(run_dir), texts, n_steps=steps):
        if as_json:
            print(json.dumps({k: v for k, v in e.to_json().items() if k != "rollout"}))
        else:
            out.print(
                f"[bold]{esc(e.label)}[/] ({e.score:.3f})  ",
                render_terminal(e),
                f"  [dim]completeness delta {e.delta:+.1e}[/]",
            )
    if not as_json:
        out.print("[dim]green: toward the predicted label, red: against it[/]")


@app.command()
def audit(run_dir: str = typer.Argument(..., help="a run directory")) -> None:
    """Explanations and a fairness audit of a run (the recipe's audit section, or defaults); exit 3 if a gate fails."""
    from pathlib import Path

    from keel.report import write_report
    from keel.trust.audit import run_audit

    if not Path(run_dir).is_dir():
        raise KeelError(f"run directory '{run_dir}' not found; pass the folder `keel run` printed (see runs/)")
    try:
        run_audit(run_dir)
    finally:
        if (Path(run_dir) / "audit").is_dir():
            out.print(
                f"wrote {esc(Path(run_dir) / 'audit')}/, {esc(Path(run_dir) / 'model' / 'MODEL_CARD.md')} and "
                f"{esc(write_report(run_dir))}"
            )


# -- helpers -------------------------------------------------------------------------------------


def _load(recipe: str, overrides):
    from keel.recipe import load_recipe

    return load_recipe(recipe, overrides)


def _print_eval(result: dict) -> None:
    if "accuracy" in result:
        base = result.get("baseline")
        line = f"{esc(result['split'])}: accuracy [bold]{result['accuracy']:.4f}[/], macro-F1 [bold]{result['macro_f1']:.4f}[/] (n={result['n']})"
        if base:
            whose = {"file": "this file's", "training split": "the training split's"}.get(base.get("of"), "the")
            line += (
                f"; majority-class baseline ({whose} most frequent label, '{esc(base['label'])}'): accuracy "
                f"{base['accuracy']:.4f}, macro-F1 {base['macro_f1']:.4f}"
            )
        out.print(line)
    elif "reply_loss" in result:
        out.print(
            f"{esc(result['split'])}: reply-only loss [bold]{result['reply_loss']:.4f}[/] (perplexity "
            f"{_ppl(result['reply_perplexity'])}) on {result['reply_tokens']:,} reply tokens of {result['n']:,} "
            f"examples; every token: loss {result['loss_all_tokens']:.4f}, perplexity "
            f"{_ppl(result['perplexity_all_tokens'])}"
        )
    elif "loss_before" in result:  # written by an SFT run before `keel eval` computed the all-token figures
        out.print(
            f"{esc(result['split'])}: reply-only loss [bold]{result['loss']:.4f}[/] (perplexity "
            f"{_ppl(result['perplexity'])}; before training {result['loss_before']:.4f}) on {result['n']:,} examples"
        )
    else:
        tokens = f" on {result['tokens']:,} tokens" if result.get("tokens") else ""
        out.print(
            f"{esc(result['split'])}: loss [bold]{result['loss']:.4f}[/], perplexity {_ppl(result.get('perplexity'))}{tokens}"
        )


def _ppl(v) -> str:
    """Perplexity to sensible precision: 2 places when small, whole numbers when large."""
    if v is None or math.isnan(v):
        return "not measured"
    return f"{v:.2f}" if v < 100 else f"{v:,.0f}"


def _print_results(run_dir) -> None:
    from keel.compress.budget import versus_teacher
    from keel.progress import is_main_process

    if not is_main_process():
        return
    test_file = run_dir / "eval" / "test.json"
    test = json.loads(test_file.read_text()) if test_file.exists() else {}
    if test:
        _print_eval(test)
    from keel.rundir import deployable

    pick = deployable(run_dir) or {}
    if pick.get("deployable"):
        r, score = pick["figures"], pick.get("test") or pick["figures"]
        scored = f" on {score['n']:,} test examples" if "n" in score else ""
        picked = "picked on the validation split; " if "test" in pick else ""
        out.print(
            f"deployable model: [bold]{pick['deployable']}[/] ({picked}accuracy "
            f"{score['accuracy']:.4f}{scored}, {versus_teacher(score['accuracy_drop_points'])}, "
            f"{r['speedup_p50_vs_pipeline']:.1f}x lower p50 latency, {r['throughput_vs_pipeline']:.1f}x throughput, "
            f"{r['smaller_vs_pipeline']:.1f}x smaller than the teacher through the HF pipeline)"
        )
    shown = esc(run_dir)
    out.print(f"run directory: [bold]{shown}[/]   report: {esc(run_dir / 'report.html')}")
    out.print("next:")
    info_file = run_dir / "model" / "keel.json"  # absent when sft.merge is false: the run ends with its adapter
    task = json.loads(info_file.read_text())["task"] if info_file.is_file() else None
    if task == "classification":
        backend = f" --backend {pick['deployable']}" if pick.get("deployable") else ""
        out.print(f"  keel predict {shown}{backend} {esc(_example_text(run_dir))}")
        out.print(f"  keel eval {shown} --data my_labelled.csv")
    elif task is None and (run_dir / "adapter").is_dir():
        out.print(f"  the LoRA adapter is in {esc(run_dir / 'adapter')} (set sft.merge=true for a merged model/)")
    elif test:
        out.print(f"  keel eval {shown}")
        if task == "causal-lm":
            import yaml

            recipe_file = run_dir / "recipe.yaml"
            raw = (yaml.safe_load(recipe_file.read_text()) if recipe_file.is_file() else None) or {}
            other = (
                "more_chats.jsonl" if raw.get("sft") else "more_pairs.jsonl" if raw.get("align") else "more_text.jsonl"
            )
            out.print(f"  keel eval {shown} --data {other}   (a file in the format the run was trained on)")
    out.print(f"  keel run my_recipe.yaml            (copy {esc(run_dir / 'recipe.yaml')} and edit it)")


def _example_text(run_dir, width: int = 60) -> str:
    """A real text from the run's test split, on one line, shortened at a word, quoted for a POSIX shell."""
    import shlex

    try:
        from keel.data.splits import load_frozen

        texts = [t for t in load_frozen(run_dir).test["text"].astype(str) if t.strip()]
    except (KeelError, OSError, ValueError, KeyError):  # no frozen splits (an older run): a placeholder instead
        texts = []
    if not texts:
        return shlex.quote("a text to classify")
    text = "".join(c if c.isprintable() else " " for c in texts[0])
    text = " ".join(text.split())
    if len(text) > width:
        text = text[:width].rsplit(" ", 1)[0] or text[:width]
    return shlex.quote(text)


def main() -> None:
    args = sys.argv[1:]
    debug = "--debug" in args
    if debug:  # accepted anywhere on the line, not only before the verb
        args = ["--debug", *[a for a in args if a != "--debug"]]
    try:
        if app(args=args, prog_name="keel", standalone_mode=False) == 130:
            raise KeyboardInterrupt  # typer returns Ctrl-C as exit code 130 when not standalone: not a success
    except KeelError as e:
        if debug:
            raise
        safe_print(console, f"[red]error:[/] {esc(e)}", soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]; the last complete checkpoint is kept (resume with --resume)")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        if debug:
            raise
        safe_print(
            console,
            f"[red]error:[/] unexpected {type(e).__name__}: {esc(e)}  (run again with --debug for the traceback)",
            soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
