"""What the run verbs print: metrics lines, the deployable pick, and the next commands to try."""

from __future__ import annotations

import json
import math

from keel.errors import KeelError
from keel.progress import esc, out


def print_eval(result: dict) -> None:
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


def print_results(run_dir) -> None:
    from keel.compress.budget import versus_teacher
    from keel.progress import is_main_process

    if not is_main_process():
        return
    test_file = run_dir / "eval" / "test.json"
    test = json.loads(test_file.read_text()) if test_file.exists() else {}
    if test:
        print_eval(test)
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
        out.print(f"  keel predict {shown}{backend} {esc(example_text(run_dir))}")
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


def example_text(run_dir, width: int = 60) -> str:
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
