"""Every section of report.html and of MODEL_CARD.md reads as a person wrote it: no Python None, nan, False or a lone ?
in any figure or table cell. Rendered for every built-in recipe from synthetic run folders (training each would take
minutes), with the figures a real run leaves unmeasured: a throughput that was not timed, a fairness difference with
fewer than two ranked groups, SecAgg+ off, a federated run's missing step timings."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from keel.recipe import builtin_recipes, load_recipe

pytestmark = pytest.mark.slow  # renders the report of every built-in recipe (~40 s)

PYTHONISH = re.compile(r"\b(None|nan|NaN|False|True)\b|(?:^|\s)\?(?:\s|$|[.,;)])")


class _Visible(HTMLParser):
    """Text of every cell, paragraph and list item, outside <pre> (the recipe as written, YAML)."""

    def __init__(self):
        super().__init__()
        self.chunks: list[str] = []
        self._pre = 0

    def handle_starttag(self, tag, attrs):
        self._pre += tag == "pre"

    def handle_endtag(self, tag):
        self._pre -= tag == "pre"

    def handle_data(self, data):
        if not self._pre and data.strip():
            self.chunks.append(data.strip())


def python_words(page: str) -> list[str]:
    parser = _Visible()
    parser.feed(page)
    return [c for c in parser.chunks if PYTHONISH.search(c)]


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def synthetic_run(root: Path, name: str) -> Path:
    """A run folder with the files a finished run of built-in recipe NAME writes (values made up, shapes real)."""
    recipe = load_recipe(name)
    run = root / name
    labels = ["negative", "neutral", "positive"] if recipe.task == "classification" else []
    counts = {"train": 2400, "validation": 300, "test": 300}
    train = {
        "steps": 300,
        "best_step": 300,
        "selection_metric": recipe.selection_metric,
        "best_metric": 0.61,
        "labels": labels,
        "data": {"source": recipe.data.name or recipe.data.path, "counts": counts},
        "samples_per_second": None,
        "peak_rss_mb": 1234.5,
    }  # a resumed run has no throughput
    info = {
        "name": name,
        "task": recipe.task,
        "recipe_sha256": recipe.sha256(),
        "keel_version": "0.1.0",
        "status": "finished",
        "train_wall_seconds": 61.23,
    }
    _write(run / "recipe.yaml", builtin_recipes()[name].read_text())
    # one epoch: the validation record is at the last step
    metrics = [{"step": s, "epoch": 1, "loss": 1.0 / s, "lr": 1e-4} for s in range(1, 31)]
    if recipe.task == "classification":
        metrics.append({"split": "validation", "step": 30, "epoch": 1, "loss": 0.7, "accuracy": 0.71, "macro_f1": 0.69})
        _write(
            run / "eval" / "test.json",
            {
                "split": "test",
                "n": 300,
                "accuracy": 0.7,
                "macro_f1": 0.68,
                "loss": 0.71,
                "labels": labels,
                "confusion": [[80, 10, 10], [10, 80, 10], [10, 10, 80]],
                "baseline": {"label": "neutral", "accuracy": 0.4, "macro_f1": 0.19, "of": "training split"},
            },
        )
        _write(
            run / "data_summary.json",
            {
                "source": train["data"]["source"],
                "labels": labels,
                "splits": {
                    s: {
                        "n": n,
                        "tokens_mean": 14.8,
                        "tokens_p95": 31.0,
                        "truncated": 0,
                        "classes": {lab: n // 3 for lab in labels},
                    }
                    for s, n in counts.items()
                },
            },
        )
    elif recipe.sft:
        _write(
            run / "eval" / "test.json",
            {
                "split": "test",
                "loss": 1.9,
                "perplexity": 6.7,
                "loss_before": 2.5,
                "perplexity_before": 12.2,
                "n": 40,
                "loss_on": "completion tokens only",
            },
        )
        _write(
            run / "train_logs.jsonl",
            "\n".join(json.dumps({"stage": "SFT", "step": s, "loss": 2.0 / s}) for s in range(1, 6)),
        )
    else:
        metrics.append({"split": "validation", "step": 30, "epoch": 1, "loss": 3.1, "perplexity": 22.2})
        _write(run / "eval" / "test.json", {"split": "test", "loss": 3.2, "perplexity": 24.5, "tokens": 8128})
        _write(
            run / "data_summary.json",
            {
                "source": train["data"]["source"],
                "labels": [],
                "splits": {
                    s: {"n": n, "tokens_mean": 128.0, "tokens_p95": 128.0, "truncated": 0} for s, n in counts.items()
                },
            },
        )
        _write(
            run / "eval" / "samples.json",
            {"temperature": 0.8, "top_k": 50, "samples": [{"prompt": "ROMEO:", "completion": " what light"}]},
        )
    if recipe.align:
        side = {"preference_agreement": 0.5, "crows_pairs": {"stereotype_score": 54.7}, "shakespeare_perplexity": 30.1}
        _write(
            run / "eval" / "align.json",
            {
                "method": "dpo",
                "beta": 0.1,
                "train_pairs": 600,
                "held_out_pairs": 150,
                "before": side,
                "after": {**side, "preference_agreement": 0.6},
                "closer_to_50_points": 1.4,
                "alignment_tax_pct": -0.5,
                "win_rate": {"win_rate": 0.66, "n": 16},
                "reward_model_accuracy": 0.7,
                "samples": [{"prompt": "He is", "reference": " a man", "aligned": " kind"}],
            },
        )
    if recipe.federated:
        train.update(
            {
                "federated": True,
                "rounds_done": 4,
                "rounds_planned": 4,
                "rounds_skipped": 0,
                "strategy": "fedavg",
                "sites": 10,
                "secagg": False,
                "seconds_per_round": 12.345,
            }
        )
        train.pop("samples_per_second"), train.pop("peak_rss_mb")
        metrics = [
            {
                "split": "validation",
                "step": r,
                "epoch": r,
                "round": r,
                "loss": 0.7,
                "accuracy": 0.5 + r / 20,
                "macro_f1": 0.4 + r / 20,
            }
            for r in range(5)
        ]  # one record per round, as keel federate writes
    if recipe.audit:
        groups = [
            {
                "group": "women",
                "n": 40,
                "accuracy": 0.7,
                "selection_rate": 0.3,
                "tpr": 0.6,
                "fpr": None,
                "flag": "",
                "ranked": True,
            },
            {
                "group": "men",
                "n": 12,
                "accuracy": 0.5,
                "selection_rate": 0.2,
                "tpr": None,
                "fpr": 0.1,
                "flag": "",
                "ranked": False,
            },
        ]
        flip = {"text": "she was great", "counterfactual": "he was great", "before": 0.8, "after": 0.4}
        _write(
            run / "audit" / "fairness.json",
            {
                "n": 300,
                "split": "test",
                "source": "identity-term lexicon",
                "positive_label": "positive",
                "min_group_size": 30,
                "attributes": {
                    "gender": {
                        "demographic_parity_difference": None,
                        "equalized_odds_difference": None,
                        "groups": groups,
                        "ranked_groups": ["women"],
                        "worst_group_accuracy": 0.7,
                    }
                },
                "subgroup_aucs": [
                    {"subgroup": "women", "n": 40, "subgroup_auc": 0.8, "bpsn_auc": None, "bnsp_auc": 0.7, "flag": None}
                ],
                "overall_auc": 0.81,
                "counterfactual": {
                    "all": {
                        "n": 20,
                        "flip_rate": 0.05,
                        "mean_score_change": -0.01,
                        "mean_abs_score_change": 0.02,
                        "examples": [flip],
                    },
                    "gender": {
                        "n": 20,
                        "flip_rate": 0.05,
                        "mean_score_change": -0.01,
                        "mean_abs_score_change": 0.02,
                        "examples": [flip],
                    },
                },
            },
        )
        _write(run / "audit" / "gates.json", {"checked": {}, "failures": [], "unmeasurable": []})
        _write(
            run / "audit" / "explain.json",
            {
                "method": "integrated gradients",
                "n_steps": 24,
                "n": 32,
                "completeness": {"mean_abs_delta": 1e-3, "max_abs_delta": 4e-3, "median_relative_delta": 0.002},
                "faithfulness": {
                    "n": 32,
                    "k": 3,
                    "faithful": True,
                    "comprehensiveness": 0.2,
                    "sufficiency": 0.1,
                    "comprehensiveness_random": 0.05,
                    "sufficiency_random": 0.3,
                },
                "global_importance": {"positive": [{"token": "love", "total": 1.5, "count": 4}]},
                "examples": [],
            },
        )
    info["train"] = train
    _write(run / "train.json", train)
    _write(run / "run.json", info)
    _write(run / "metrics.jsonl", "\n".join(json.dumps(m) for m in metrics))
    (run / "model").mkdir(exist_ok=True)
    _write(run / "model" / "keel.json", {"task": recipe.task, "labels": labels, "base_model": recipe.model.name})
    return run


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_report_and_card_of_every_builtin_recipe_read_as_written_by_a_person(tmp_path, name):
    from keel.report import write_report
    from keel.trust.card import model_card

    run = synthetic_run(tmp_path, name)
    page = write_report(run).read_text()
    assert "could not be built" not in page
    assert python_words(page) == []
    card = model_card(run)
    assert [line for line in card.splitlines() if PYTHONISH.search(line)] == []
    if load_recipe(name).task == "classification":
        assert "<td class='num'>14.8</td>" in page and "14.8000" not in page  # a mean token count, not a score
    if load_recipe(name).task == "classification" and not load_recipe(name).federated:
        assert "1,234 MB" in page and "training 61.2 s" in page  # units, and a sensible number of places
    if load_recipe(name).audit:
        assert page.count("she was great") == 1  # the same flipped example is shown once
        assert "not measured" in page  # a difference with one ranked group is said in words
    if load_recipe(name).federated:
        assert "SecAgg+)</th><td>off" in page and "12.3 s" in page


def test_the_detector_finds_python_values():
    assert python_words("<table><tr><td>None samples/s</td><td>?</td></tr></table><p>SecAgg+ False</p>") == [
        "None samples/s",
        "?",
        "SecAgg+ False",
    ]
    assert python_words("<pre>a: None</pre><p>what? no.</p>") == []
